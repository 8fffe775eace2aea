"""The host model cache's format: one model = one single-file safetensors in host memory.

The model-store writes each cached model as a single safetensors file under shared memory
(shards merged, data section contiguous), so a worker can bring a whole model to its device
with one bulk copy of the data section and then bind tensor views at known offsets.
This module reads that format and reports corrupt or missing files by name.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

SAFETENSORS_DTYPES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
"""Element size in bytes of each safetensors dtype we accept."""

MAX_HEADER_BYTES = 100 * 1024 * 1024


class WeightsError(ValueError):
    """A weights file is missing, truncated or malformed. The message names the file."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor in a safetensors data section: [start, end) are relative to the section."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class SafetensorsIndex:
    """Where every tensor of one file lies. ``data_offset`` is the data section's file offset."""

    path: Path
    data_offset: int
    data_bytes: int
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]


def read_index(path: str | Path) -> SafetensorsIndex:
    """Parse and validate a safetensors header without reading the data."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise WeightsError(f"{path}: corrupt safetensors header (length {header_len})")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise WeightsError(f"{path}: corrupt safetensors header: {exc}") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: corrupt safetensors header (not an object)")
    data_offset = 8 + header_len
    data_bytes = size - data_offset
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise WeightsError(f"{path}: corrupt safetensors header (__metadata__ not an object)")
    tensors: dict[str, TensorEntry] = {}
    for name, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            if not isinstance(dtype, str) or not all(map(_is_int, (*shape, start, end))):
                raise TypeError(name)
        except (KeyError, TypeError, ValueError):
            raise WeightsError(f"{path}: corrupt entry for tensor {name!r}") from None
        if dtype not in SAFETENSORS_DTYPES:
            raise WeightsError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        numel = 1
        for dim in shape:
            numel *= int(dim)
        if end - start != numel * SAFETENSORS_DTYPES[dtype] or not 0 <= start <= end <= data_bytes:
            raise WeightsError(
                f"{path}: tensor {name!r} is truncated or misplaced "
                f"(bytes {start}..{end} of a {data_bytes}-byte data section)"
            )
        tensors[name] = TensorEntry(dtype, shape, int(start), int(end))
    return SafetensorsIndex(path, data_offset, data_bytes, tensors, dict(metadata))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def model_weight_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a Hugging Face model folder, in shard order."""
    model_dir = Path(model_dir)
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise WeightsError(f"{index}: corrupt shard index: {exc}") from None
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            raise WeightsError(f"{index}: weight_map must map tensor names to shard file names")
        files = sorted(set(weight_map.values()))
        outside = [f for f in files if Path(f).name != f or f in ("", ".", "..")]
        if outside:  # only files of the folder itself: never ../x or /etc/x
            raise WeightsError(f"{index}: shard names must be files of the folder: {outside[:3]}")
        missing = [f for f in files if not (model_dir / f).is_file()]
        if missing:
            raise WeightsError(
                f"{model_dir}: shard(s) listed in {index.name} are missing: {missing}"
            )
        return [model_dir / f for f in files]
    raise WeightsError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")


@dataclass(frozen=True)
class KVShape:
    """A model's KV cache per token: per layer a key and a value of kv_heads x head_dim.
    The engine sizes its blocks from it; the model-store reports bytes per token."""

    layers: int
    kv_heads: int
    head_dim: int

    def block_elems(self, block_size: int) -> int:
        """Elements of one KV block of ``block_size`` tokens."""
        return self.layers * 2 * block_size * self.kv_heads * self.head_dim

    def bytes_per_token(self, dtype_bytes: int) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * dtype_bytes
