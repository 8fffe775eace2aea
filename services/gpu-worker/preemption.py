"""Preemption: where a request's KV goes when the device is short of it (DESIGN.md §5).

Swap out to the host KV pool (drop, and recompute later, when the pool is full), swap back in on
the swap stream overlapped with the step's prefill, preempt the newest request of a batch that
cannot fit, and hand KV to another engine on the node through the pool (export / import).
Mixed into ``Engine``; the attributes it reads are declared below and set by ``Engine``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from aegaeon.gpu_worker.arena import Arena
from aegaeon.gpu_worker.host_kv import HostKVPool, map_file
from aegaeon.gpu_worker.kv_cache import SlabAllocator, blocks_needed
from aegaeon.gpu_worker.paged_kv import PagedKV
from aegaeon.gpu_worker.requests import HostCopy, KVHandle, Request
from aegaeon.gpu_worker.runners.fallback import cache_bytes, cache_from_host, cache_to_host
from aegaeon.gpu_worker.slots import WeightSlots
from aegaeon.gpu_worker.weights_loader import ModelSpec

from aegaeon.protocol import SamplingParams

if TYPE_CHECKING:
    from aegaeon.gpu_worker.engine import EngineConfig


class Preemption:
    """Swap, drop, preempt and KV hand-off over the engine's device slabs and host pool."""

    config: EngineConfig
    device: torch.device
    dtype: torch.dtype
    esize: int
    arena: Arena
    slots: WeightSlots
    slabs: SlabAllocator
    host_kv: HostKVPool
    swap_stream: torch.cuda.Stream | None
    specs: dict[str, ModelSpec]
    counters: dict[str, int]
    last_step_preempted: list[str]
    _requests: dict[str, Request]
    _paged: dict[str, PagedKV]
    _host_frees: list[tuple[Any, int, int]]  # (CUDA event | None, offset, bytes)
    add_request: Callable[..., None]  # Engine's: admits a request
    _spec: Callable[[str], ModelSpec]  # Engine's: a registered model's spec, or KeyError

    def _paged_kv(self, name: str) -> PagedKV:
        if name not in self._paged:
            self._paged[name] = PagedKV(
                self.arena.kv, self.specs[name].kv_shape, self.config.block_size
            )
        return self._paged[name]

    def _release(self, request: Request) -> None:
        self._free_device(request)
        if request.host is not None:
            self.host_kv.free(request.host.offset, request.host.nbytes)
            request.host = None

    def _free_device(self, request: Request) -> None:
        if request.blocks:
            self.slabs.free(self._paged_kv(request.model).block_elems, request.blocks)
            request.blocks = []
        request.fallback_kv = None

    # ------------------------------------------------------------------ swap

    def drop_kv(self, request_id: str) -> None:
        """Forget a request's KV (device and host); its next step recomputes it from the prompt
        and the tokens so far, with the same tokens (DESIGN.md §5)."""
        request = self._requests.get(request_id)
        if request is not None:
            self._release(request)
            self.counters["dropped"] += 1

    def swap_out(self, request_ids: Sequence[str]) -> list[str]:
        """Move requests' device KV to the host pool; returns ids whose KV was dropped instead."""
        dropped = []
        for rid in request_ids:
            request = self._requests.get(rid)
            if request is None or not request.on_device:
                continue
            if self._swap_out_one(request):
                self.counters["swapped_out"] += 1
            else:
                self.counters["dropped"] += 1
                dropped.append(rid)
        if self.swap_stream is not None:
            self.swap_stream.synchronize()  # blocks are reused right away: copies must be done
        return dropped

    def _swap_out_one(self, request: Request) -> bool:
        if self.specs[request.model].kind == "fallback":
            return self._swap_out_fallback(request)
        kv = self._paged_kv(request.model)
        nbytes = len(request.blocks) * kv.block_elems * self.esize
        offset = self._host_allocate(nbytes)
        if offset is None:  # host pool full: drop, recompute on the next step
            self._free_device(request)
            return False
        view = (
            self.host_kv.view(offset, nbytes)
            .view(self.dtype)
            .view(len(request.blocks), kv.block_elems)
        )
        self._on_swap_stream(lambda: kv.read_blocks(request.blocks, view, non_blocking=True))
        request.host = HostCopy(offset, nbytes, len(request.blocks))
        self._free_device(request)
        return True

    def _swap_out_fallback(self, request: Request) -> bool:
        nbytes = cache_bytes(request.fallback_kv)
        offset = self._host_allocate(nbytes)
        if offset is None:
            self._free_device(request)
            return False
        shapes = cache_to_host(request.fallback_kv, self.host_kv.view(offset, nbytes))
        request.host = HostCopy(offset, nbytes, 0, shapes)
        self._free_device(request)
        return True

    def _on_swap_stream(self, fn: Any) -> None:
        if self.swap_stream is None:
            fn()
            return
        self.swap_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.swap_stream):
            fn()

    def swap_in(self, request_ids: Sequence[str]) -> None:
        """Bring swapped-out KV back to the device now (``step`` does it when needed)."""
        requests = [self._requests[r] for r in request_ids if r in self._requests]
        self._swap_in(
            [r for r in requests if r.host is not None and r.model == self.slots.resident_model]
        )

    def _swap_in(self, requests: list[Request]) -> None:
        self._start_swap_in(requests)
        self._finish_swap_in()

    def _start_swap_in(self, requests: list[Request]) -> None:
        """Issue the copies back to the device (on CUDA: on the swap stream, not waited for)."""
        for request in requests:
            assert request.host is not None
            if self.specs[request.model].kind == "fallback":
                self._swap_in_fallback(request)
            else:
                kv = self._paged_kv(request.model)
                request.blocks = self.slabs.allocate(kv.block_elems, request.host.num_blocks)
                view = self.host_kv.view(request.host.offset, request.host.nbytes).view(self.dtype)
                data = view.view(request.host.num_blocks, kv.block_elems)
                self._on_swap_stream(
                    lambda kv=kv, r=request, d=data: kv.write_blocks(r.blocks, d, non_blocking=True)
                )
        event = None
        if self.swap_stream is not None and requests:
            event = torch.cuda.Event()
            event.record(self.swap_stream)
        for request in requests:
            assert request.host is not None
            # The host bytes stay reserved until the copy has read them.
            self._host_frees.append((event, request.host.offset, request.host.nbytes))
            request.host = None
        self.counters["swapped_in"] += len(requests)
        self._reclaim_host(block=False)

    def _finish_swap_in(self) -> None:
        """Make compute wait (on the device, not the host) for swap-ins issued so far."""
        if self.swap_stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.swap_stream)

    def _reclaim_host(self, block: bool) -> None:
        """Free host extents whose swap-in copies are done (all of them when ``block``)."""
        pending = []
        for event, offset, nbytes in self._host_frees:
            if event is None or block or event.query():
                if event is not None and block:
                    event.synchronize()
                self.host_kv.free(offset, nbytes)
            else:
                pending.append((event, offset, nbytes))
        self._host_frees = pending

    def _host_allocate(self, nbytes: int) -> int | None:
        offset = self.host_kv.allocate(nbytes)
        if offset is None and self._host_frees:
            self._reclaim_host(block=True)
            offset = self.host_kv.allocate(nbytes)
        return offset

    def _swap_in_fallback(self, request: Request) -> None:
        assert request.host is not None
        data = self.host_kv.view(request.host.offset, request.host.nbytes)
        request.fallback_kv = cache_from_host(data, request.host.shapes, self.dtype, self.device)

    # ------------------------------------------------------------------ KV transfer

    def export_kv(self, request_id: str) -> KVHandle:
        """Put a request's KV in the host pool for another engine on this node to import.

        The request stays held (swapped out) until ``abort``, which frees the host copy.
        """
        request = self._requests[request_id]
        spec = self.specs[request.model]
        if spec.kind != "native" or (request.needs_prefill and not request.on_device):
            raise ValueError(f"request {request_id!r} has no exportable paged KV")
        if request.on_device and self.swap_out([request_id]):
            raise RuntimeError(f"host KV pool is full: cannot export {request_id!r}")
        assert request.host is not None
        shape = spec.kv_shape
        return KVHandle(
            str(self.host_kv.path), request.host.offset, request.host.nbytes, len(request.tokens) - 1,
            request.host.num_blocks, self.config.block_size, shape.layers, shape.kv_heads,
            shape.head_dim, str(self.dtype).removeprefix("torch."),
        )  # fmt: skip

    def import_kv(self, request_id: str, model: str, prompt_token_ids: list[int], sampling: SamplingParams, output_token_ids: Sequence[int], handle: KVHandle) -> None:  # fmt: skip
        """Admit a request whose KV another engine on this node exported (its pool file is
        mapped here); its next step decodes directly."""
        offset = self.reserve_kv_import(request_id, model, prompt_token_ids, output_token_ids, handle)  # fmt: skip
        source = map_file(Path(handle.path), handle.offset + handle.nbytes, shared=False)
        self.host_kv.view(offset, handle.nbytes).copy_(source[handle.offset :])
        self.admit_kv_import(request_id, model, prompt_token_ids, sampling, output_token_ids, handle, offset)  # fmt: skip

    def reserve_kv_import(self, request_id: str, model: str, prompt_token_ids: list[int], output_token_ids: Sequence[int], handle: KVHandle) -> int:  # fmt: skip
        """Check that ``handle``'s KV fits this engine and the request, and reserve its bytes in
        the host pool: the offset, to be filled (``host_kv_view``) from any thread, then passed
        to :meth:`admit_kv_import`, or given back with :meth:`release_kv_import`."""
        shape = self._spec(model).kv_shape
        mine = (self.config.block_size, shape.layers, shape.kv_heads, shape.head_dim, str(self.dtype).removeprefix("torch."))  # fmt: skip
        theirs = (handle.block_size, handle.layers, handle.kv_heads, handle.head_dim, handle.dtype)
        if mine != theirs:
            raise ValueError(f"KV of {request_id!r} has layout {theirs}, this engine needs {mine}")
        if handle.num_tokens != len(prompt_token_ids) + len(output_token_ids) - 1:
            raise ValueError(
                f"KV of {request_id!r} covers {handle.num_tokens} tokens, not prompt + outputs - 1"
            )
        offset = self._host_allocate(handle.nbytes)
        if offset is None:
            raise RuntimeError(f"host KV pool is full: cannot import {request_id!r}")
        return offset

    def host_kv_view(self, offset: int, nbytes: int) -> torch.Tensor:
        """Bytes of the host pool (a reserved import region is written through this)."""
        return self.host_kv.view(offset, nbytes)

    def release_kv_import(self, offset: int, nbytes: int) -> None:
        """Give back a reserved import region whose bytes never arrived."""
        self.host_kv.free(offset, nbytes)

    def admit_kv_import(self, request_id: str, model: str, prompt_token_ids: list[int], sampling: SamplingParams, output_token_ids: Sequence[int], handle: KVHandle, offset: int) -> None:  # fmt: skip
        """Admit a request whose KV now fills the reserved region at ``offset``."""
        self.add_request(request_id, model, prompt_token_ids, sampling, output_token_ids)
        self._requests[request_id].host = HostCopy(offset, handle.nbytes, handle.num_blocks)

    # ------------------------------------------------------------------ room for a step

    def _make_room(self, batch: list[Request]) -> list[Request]:
        """Ensure blocks for every request in the batch (swap out others, then preempt the newest)."""
        kv = self._paged_kv(self.slots.resident_model or "")
        while batch:
            short = self._blocks_short(batch, kv)
            if short <= 0:
                return batch
            victim = self._lru_outside(batch)
            if victim is not None:
                self.swap_out([victim.request_id])
                continue
            newest = max(batch, key=lambda r: r.order)
            if len(batch) == 1:
                raise RuntimeError(
                    f"request {newest.request_id!r} needs more KV than the whole device pool holds"
                )
            batch.remove(newest)
            self.last_step_preempted.append(newest.request_id)
            self.counters["preempted"] += 1
            if newest.on_device:
                self.swap_out([newest.request_id])
        return batch

    def _blocks_short(self, batch: list[Request], kv: PagedKV) -> int:
        need = sum(blocks_needed(len(r.tokens), kv.block_size) - len(r.blocks) for r in batch)
        return need - self.slabs.num_free_blocks(kv.block_elems)

    def _lru_outside(self, batch: list[Request]) -> Request | None:
        inside = {r.request_id for r in batch}
        held = [r for r in self._requests.values() if r.blocks and r.request_id not in inside]
        return min(held, key=lambda r: r.last_used) if held else None
