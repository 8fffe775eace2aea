"""The device memory arena: one allocation at start, carved into weight slots and a KV region.

    arena (uint8): | weight slot 0 | weight slot 1 | KV region (engine dtype, cut into slabs) |

A weight slot holds one model: its safetensors data section copied byte for byte (slots.py
does the copy, in the background when prefetched), then tensor views at the file's offsets
(bump-allocated space after it only when a dtype must be converted). Nothing here allocates
after construction except those conversions. The host side is the host-cache file mapped shared
and read-only (pinned read-only on CUDA), so it is neither copied in RAM nor written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from aegaeon.gpu_worker.host_kv import map_file_read_only, pin, unpin
from aegaeon.gpu_worker.weights_loader import TORCH_DTYPES, ModelError, ModelSpec

ALIGN = 4096


def align_up(value: int, align: int = ALIGN) -> int:
    return -(-value // align) * align


def align_down(value: int, align: int = ALIGN) -> int:
    return value // align * align


@dataclass
class HostWeights:
    """A model's host-cache file mapped into this process (pinned on CUDA), kept across switches
    while the file is the one the host cache holds at ``path``."""

    mapping: torch.Tensor  # the whole file from its first byte: the address that was pinned
    tensor: torch.Tensor  # the data section only (``data_offset`` bytes into ``mapping``)
    pinned: bool
    path: Path
    file_id: tuple[int, int]  # (device, inode) of the file mapped

    def is_current(self) -> bool:
        """Whether ``path`` still names the file mapped. The host cache unlinks a file it evicts
        (and writes a new one when the model comes back): a mapping of the old one keeps its
        pages alive, outside the cache's budget, and would copy from it."""
        return file_id(self.path) == self.file_id

    def release(self) -> None:
        """Unpin (the registered base, not the data section); the mapping goes with the object."""
        if self.pinned:
            self.pinned = False
            unpin(self.mapping)


class Arena:
    """One device allocation: ``slots`` weight slots, then the KV region."""

    def __init__(self, device: torch.device, total: int, weight_bytes: int, slots: int, kv_dtype: torch.dtype) -> None:  # fmt: skip
        if weight_bytes >= total:
            raise ValueError(
                f"weight budget {weight_bytes} leaves no KV room in a {total}-byte arena"
            )
        self.device = device
        self.buffer = torch.empty(total, dtype=torch.uint8, device=device)
        self.slot_bytes = align_down(weight_bytes // slots)
        self.slots = [
            self.buffer[i * self.slot_bytes : (i + 1) * self.slot_bytes] for i in range(slots)
        ]
        kv_start = align_up(self.slot_bytes * slots)
        esize = torch.empty((), dtype=kv_dtype).element_size()
        kv_len = (total - kv_start) // esize
        self.kv = self.buffer[kv_start : kv_start + kv_len * esize].view(kv_dtype)

    @property
    def total_bytes(self) -> int:
        return self.buffer.numel()

    @property
    def weight_bytes(self) -> int:
        return self.slot_bytes * len(self.slots)

    def holds(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` is a view into this arena (a weight slot or the KV region)."""
        return tensor.untyped_storage().data_ptr() == self.buffer.untyped_storage().data_ptr()

    def release(self) -> None:
        empty = torch.empty(0, dtype=torch.uint8, device=self.device)
        self.buffer, self.slots, self.kv = empty, [], empty


def map_host_weights(spec: ModelSpec, device: torch.device) -> HostWeights:
    """Map the host-cache file shared and read-only; pin it read-only when the device is CUDA."""
    index, path = spec.index, Path(spec.weights_path)
    mapped = file_id(path)  # before mapping: a file replaced meanwhile reads as stale, remapped
    whole = map_file_read_only(path, index.data_offset + index.data_bytes)
    pinned = pin(whole, read_only=True) if device.type == "cuda" else False
    return HostWeights(whole, whole[index.data_offset :], pinned, path, mapped or (-1, -1))


def file_id(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file at ``path``; None when there is none."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino


def slot_need(spec: ModelSpec, dtype: torch.dtype) -> int:
    """Bytes of a slot a model takes: its data section plus space for converted tensors."""
    need = align_up(spec.index.data_bytes)
    esize = torch.empty((), dtype=dtype).element_size()
    for entry in spec.index.tensors.values():
        if TORCH_DTYPES[entry.dtype] != str(dtype).removeprefix("torch.") or entry.start % esize:
            need += align_up(entry.nbytes // _src_esize(entry.dtype) * esize, 64)
    return need


def _src_esize(st_dtype: str) -> int:
    return 4 if st_dtype == "F32" else 2


def bind_views(slot: torch.Tensor, spec: ModelSpec, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Tensor views at the file's offsets; tensors of another dtype are converted after the data."""
    tensors: dict[str, torch.Tensor] = {}
    esize = torch.empty((), dtype=dtype).element_size()
    bump = align_up(spec.index.data_bytes)
    for name, entry in spec.index.tensors.items():
        src_dtype = getattr(torch, TORCH_DTYPES[entry.dtype])
        raw = slot[entry.start : entry.end]
        if src_dtype == dtype and entry.start % esize == 0:
            tensors[name] = raw.view(dtype).view(entry.shape)
            continue
        numel = entry.nbytes // _src_esize(entry.dtype)
        if bump + numel * esize > slot.numel():
            raise ModelError(f"{spec.weights_path}: converting {name!r} overflows the weight slot")
        out = slot[bump : bump + numel * esize].view(dtype).view(entry.shape)
        out.copy_(raw.clone().view(src_dtype).view(entry.shape))  # clone: raw may be misaligned
        tensors[name] = out
        bump = align_up(bump + numel * esize, 64)
    return tensors
