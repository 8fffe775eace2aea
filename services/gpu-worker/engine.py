"""The engine: explicit memory, model switching, paged KV, preemption and swap, one step at a time.

Single-threaded: the worker shell calls every method from one thread. Created once per process;
a model switch rebinds weights in the arena and never rebuilds anything (DESIGN.md §5).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from aegaeon.gpu_worker.arena import Arena, slot_need
from aegaeon.gpu_worker.host_kv import HostKVPool, map_file
from aegaeon.gpu_worker.kv_cache import SlabAllocator, blocks_needed
from aegaeon.gpu_worker.paged_kv import PagedKV
from aegaeon.gpu_worker.requests import (
    EngineStats,
    HostCopy,
    KVHandle,
    Request,
    SwitchStats,
    TokenOutput,
)
from aegaeon.gpu_worker.runners.fallback import (
    FallbackRunner,
    cache_bytes,
    cache_from_host,
    cache_to_host,
)
from aegaeon.gpu_worker.runners.llama import LlamaRunner
from aegaeon.gpu_worker.sampler import choose, finish_reason, is_plain_greedy
from aegaeon.gpu_worker.slots import WeightSlots
from aegaeon.gpu_worker.weights_loader import ModelError, ModelSpec, load_spec

from aegaeon.config import shm_dir
from aegaeon.protocol import SamplingParams

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineStats",
    "KVHandle",
    "ModelError",
    "SwitchStats",
    "TokenOutput",
]

MiB = 1 << 20
GiB = 1 << 30


@dataclass
class EngineConfig:
    """How much memory the engine takes and how it cuts it; validated when the engine starts."""

    device: str = "cpu"  # "cpu" or "cuda" / "cuda:N"
    dtype: str | None = None  # default float32 on CPU, bfloat16 on CUDA
    arena_bytes: int | None = None  # CPU: 2 GiB; CUDA: 90% of free memory
    weight_slots: int = 2  # the resident model and one prefetched model
    weight_budget_bytes: int | None = None  # default: half the arena
    block_size: int = 16  # tokens per KV block
    host_kv_bytes: int = 512 * MiB  # the shared-memory swap target
    host_kv_dir: str | None = None  # default aegaeon.config.shm_dir()
    slab_bytes: int | None = None  # KV slab size; default 2 MiB on CPU, 64 MiB on CUDA
    copy_chunk_bytes: int = 32 * MiB  # weight copies go in chunks: a prefetch stops between two


class Engine:
    """Serves many models on one device, one resident at a time, switching between steps."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = torch.device(config.device)
        default_dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        self.dtype: torch.dtype = getattr(torch, config.dtype or default_dtype)
        self.esize = torch.empty((), dtype=self.dtype).element_size()
        total = config.arena_bytes or self._default_arena_bytes()
        weights = config.weight_budget_bytes or total // 2
        self.arena = Arena(self.device, total, weights, config.weight_slots, self.dtype)
        slab_bytes = config.slab_bytes or (64 * MiB if self.device.type == "cuda" else 2 * MiB)
        slab_elems = slab_bytes // self.esize
        self.slabs = SlabAllocator(self.arena.kv.numel() // slab_elems, slab_elems)
        directory = Path(config.host_kv_dir) if config.host_kv_dir else shm_dir()
        self.host_kv = HostKVPool(
            config.host_kv_bytes, directory, pin_memory=self.device.type == "cuda"
        )
        cuda = self.device.type == "cuda"
        self.swap_stream = torch.cuda.Stream(self.device) if cuda else None
        self.slots = WeightSlots(self.arena, self.dtype, config.copy_chunk_bytes)
        self.specs: dict[str, ModelSpec] = {}
        self._native: dict[str, LlamaRunner] = {}  # one skeleton per architecture
        self._fallback = FallbackRunner(self.device, self.dtype)
        self._paged: dict[str, PagedKV] = {}
        self._requests: dict[str, Request] = {}
        self._order = 0
        self._clock = 0
        self.last_step_preempted: list[str] = []
        self._host_frees: list[tuple[Any, int, int]] = []  # (CUDA event | None, offset, bytes)
        self.counters = {"swapped_out": 0, "swapped_in": 0, "dropped": 0, "preempted": 0}
        """Totals since start: what the KV budget made the engine do (tests and metrics read it)."""

    def _default_arena_bytes(self) -> int:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free * 0.9)
        return 2 * GiB

    # ------------------------------------------------------------------ models

    def register_model(self, name: str, model_dir: str | Path, weights_path: str | Path | None = None) -> None:  # fmt: skip
        """Validate and remember a model; every problem raises ``ModelError`` naming the file."""
        spec = load_spec(name, model_dir, weights_path)
        if slot_need(spec, self.dtype) > self.arena.slot_bytes:
            raise ModelError(
                f"{spec.weights_path}: {spec.weight_bytes} bytes of weights do not fit a "
                f"{self.arena.slot_bytes}-byte weight slot (raise weight_budget_bytes)"
            )
        if (
            spec.kind == "native"
            and spec.kv_shape.block_elems(self.config.block_size) > self.slabs.slab_elems
        ):
            raise ModelError(f"{model_dir}: one KV block is larger than a slab (raise slab_bytes)")
        if spec.kind == "fallback":
            self._fallback.check(spec)
        old = self.specs.get(name)
        if old is not None and old.weights_path != spec.weights_path:
            self._forget_weights(name)
        self.specs[name] = spec

    def _forget_weights(self, name: str) -> None:
        self.slots.forget(name)

    def invalidate_weights(self) -> None:
        """Forget what the weight slots hold (someone wrote over them); the next switch copies."""
        self.slots.invalidate()

    @property
    def resident_model(self) -> str | None:
        return self.slots.resident_model

    def _spec(self, name: str) -> ModelSpec:
        if name not in self.specs:
            raise KeyError(f"model {name!r} is not registered")
        return self.specs[name]

    def start_prefetch(self, name: str) -> None:
        """Begin copying a model's weights into the free slot while steps go on; no waiting.

        A no-op for the resident model, one already staged, or with a single slot. A later
        ``start_prefetch`` of another model abandons this one.
        """
        self.slots.start_prefetch(self._spec(name))

    def prefetch(self, name: str) -> None:
        """Stage a model's weights in the non-resident slot and wait until they are there."""
        self.start_prefetch(name)
        if self.slots.prefetching == name:
            self.slots.finish_prefetch()

    def switch_to(self, name: str) -> SwitchStats:
        """Make ``name`` resident. Prefetched: rebind views only. Being prefetched: wait for the
        rest of that copy. Otherwise: copy its weights now. ``seconds`` is the time waited."""
        if name == self.resident_model:
            return SwitchStats(name, name, 0.0, 0)
        spec = self._spec(name)
        start = time.perf_counter()
        previous = self.resident_model
        done = self.slots.switch(spec)
        self._bind(name, done.views)
        return SwitchStats(
            previous, name, time.perf_counter() - start, done.waited_bytes, done.prefetched_bytes
        )

    def _bind(self, name: str, views: dict[str, torch.Tensor]) -> None:
        spec = self.specs[name]
        if spec.kind == "fallback":
            self._fallback.bind(spec, views)
            return
        model_type = spec.hf_config.model_type
        runner = self._native.get(model_type)
        if runner is None:
            runner = self._native[model_type] = LlamaRunner(self.device, self.dtype)
        runner.bind(spec.hf_config, views)

    def _paged_kv(self, name: str) -> PagedKV:
        if name not in self._paged:
            self._paged[name] = PagedKV(
                self.arena.kv, self.specs[name].kv_shape, self.config.block_size
            )
        return self._paged[name]

    # ------------------------------------------------------------------ requests

    def add_request(self, request_id: str, model: str, prompt_token_ids: list[int], sampling: SamplingParams, output_token_ids: Sequence[int] = ()) -> None:  # fmt: skip
        """Admit a request; ``output_token_ids`` are tokens produced before a recovery."""
        spec = self._spec(model)
        if request_id in self._requests:
            raise ValueError(f"request {request_id!r} already held")
        vocab = spec.hf_config.vocab_size
        tokens = [*prompt_token_ids, *output_token_ids]
        if not prompt_token_ids:
            raise ValueError(f"request {request_id!r}: empty prompt")
        if any(not 0 <= t < vocab for t in tokens):
            raise ValueError(
                f"request {request_id!r}: token id outside the vocabulary (0..{vocab - 1})"
            )
        limit = getattr(spec.hf_config, "max_position_embeddings", None) or getattr(
            spec.hf_config, "n_positions", None
        )
        if limit and len(prompt_token_ids) + sampling.max_tokens > limit:
            raise ValueError(
                f"request {request_id!r}: prompt + max_tokens exceeds the model's {limit} positions"
            )
        if len(output_token_ids) >= sampling.max_tokens:
            raise ValueError(f"request {request_id!r}: already has max_tokens outputs")
        seed = (
            sampling.seed
            if sampling.seed is not None
            else int.from_bytes(os.urandom(8), "little") >> 1
        )
        self._order += 1
        self._requests[request_id] = Request(
            request_id,
            model,
            list(prompt_token_ids),
            sampling,
            list(output_token_ids),
            seed,
            self._order,
        )

    def request_ids(self, model: str | None = None) -> list[str]:
        return [r.request_id for r in self._requests.values() if model is None or r.model == model]

    def abort(self, request_id: str) -> None:
        """Forget a request and free its device and host KV."""
        request = self._requests.pop(request_id, None)
        if request is not None:
            self._release(request)

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
            [r for r in requests if r.host is not None and r.model == self.resident_model]
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
        """Admit a request whose KV another engine exported; its next step decodes directly."""
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
        source = map_file(Path(handle.path), handle.offset + handle.nbytes, shared=False)
        self.host_kv.view(offset, handle.nbytes).copy_(source[handle.offset :])
        self.add_request(request_id, model, prompt_token_ids, sampling, output_token_ids)
        self._requests[request_id].host = HostCopy(offset, handle.nbytes, handle.num_blocks)

    # ------------------------------------------------------------------ room for a step

    def _make_room(self, batch: list[Request]) -> list[Request]:
        """Ensure blocks for every request in the batch (swap out others, then preempt the newest)."""
        kv = self._paged_kv(self.resident_model or "")
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

    # ------------------------------------------------------------------ step

    def step(self, request_ids: Sequence[str]) -> list[TokenOutput]:
        """One token for each given request of the resident model (see the module docstring)."""
        self.last_step_preempted = []
        batch = [self._requests[rid] for rid in request_ids]
        for request in batch:
            if request.model != self.resident_model:
                raise ValueError(f"request {request.request_id!r} is for {request.model!r}, resident is {self.resident_model!r}")  # fmt: skip
        if not batch:
            return []
        self._clock += 1
        with torch.inference_mode():
            if self.specs[batch[0].model].kind == "fallback":
                logits = self._fallback_step(batch)
            else:
                batch = self._make_room(batch)
                logits = self._native_step(batch)
            return self._sample(batch, logits)

    def _native_step(self, batch: list[Request]) -> torch.Tensor:
        kv = self._paged_kv(batch[0].model)
        # Swap-ins run on their own stream while the prefill (which needs none of them) computes.
        self._start_swap_in([r for r in batch if r.host is not None])
        prefill = [r for r in batch if not r.blocks]
        for request in batch:
            grow = blocks_needed(len(request.tokens), kv.block_size) - len(request.blocks)
            if grow > 0:
                request.blocks += self.slabs.allocate(kv.block_elems, grow)
        runner = self._native[self.specs[batch[0].model].hf_config.model_type]
        if len(prefill) == len(batch):
            return runner.prefill([r.tokens for r in batch], [r.blocks for r in batch], kv)
        if not prefill:
            self._finish_swap_in()
            lengths = [len(r.tokens) for r in batch]
            return runner.decode(
                [r.tokens[-1] for r in batch], lengths, [r.blocks for r in batch], kv
            )
        rows: dict[str, torch.Tensor] = {}
        if prefill:
            logits = runner.prefill([r.tokens for r in prefill], [r.blocks for r in prefill], kv)
            rows.update({r.request_id: logits[i] for i, r in enumerate(prefill)})
        decode = [r for r in batch if r.request_id not in rows]
        self._finish_swap_in()
        if decode:
            lengths = [len(r.tokens) for r in decode]
            logits = runner.decode(
                [r.tokens[-1] for r in decode], lengths, [r.blocks for r in decode], kv
            )
            rows.update({r.request_id: logits[i] for i, r in enumerate(decode)})
        return torch.stack([rows[r.request_id] for r in batch])

    def _fallback_step(self, batch: list[Request]) -> torch.Tensor:
        self._swap_in([r for r in batch if r.host is not None])
        rows = []
        for request in batch:
            if request.fallback_kv is None:
                logits, request.fallback_kv = self._fallback.forward(request.tokens, None)
            else:
                logits, request.fallback_kv = self._fallback.forward(
                    request.tokens[-1:], request.fallback_kv
                )
            rows.append(logits)
        return torch.stack(rows)

    def _sample(self, batch: list[Request], logits: torch.Tensor) -> list[TokenOutput]:
        greedy = [i for i, r in enumerate(batch) if is_plain_greedy(r.sampling)]
        rows = logits if len(greedy) == len(batch) else logits[greedy]  # list indexing is slow
        picks = dict(zip(greedy, rows.argmax(-1).tolist(), strict=True)) if greedy else {}
        outputs = []
        eos = {r.model: self.specs[r.model].eos_token_ids for r in batch}
        for i, request in enumerate(batch):
            if i in picks:
                token, logprob, top = picks[i], None, []
            else:
                choice = choose(logits[i], request.sampling, request.outputs, request.seed)
                token, logprob, top = choice.token_id, choice.logprob, choice.top_logprobs
            request.outputs.append(token)
            request.last_used = self._clock
            reason = finish_reason(
                token, len(request.outputs), request.sampling, eos[request.model]
            )
            outputs.append(
                TokenOutput(
                    request.request_id, len(request.outputs) - 1, token, logprob, top, reason
                )
            )
            if reason is not None:
                self.abort(request.request_id)
        return outputs

    # ------------------------------------------------------------------ stats / close

    def stats(self) -> EngineStats:
        """Capacity in blocks of the resident model's shape (or the first registered model's)."""
        name = self.resident_model or next(iter(self.specs), None)
        total = free = 0
        if name is not None and self.specs[name].kind == "native":
            elems = self.specs[name].kv_shape.block_elems(self.config.block_size)
            total, free = self.slabs.num_total_blocks(elems), self.slabs.num_free_blocks(elems)
        return EngineStats(
            device=_device_name(self.device),
            resident_model=self.resident_model,
            arena_bytes=self.arena.total_bytes,
            weight_budget_bytes=self.arena.weight_bytes,
            block_size=self.config.block_size,
            kv_blocks_total=total,
            kv_blocks_free=free,
            host_kv_bytes_total=self.host_kv.nbytes,
            host_kv_bytes_free=self.host_kv.free_bytes,
            num_requests=len(self._requests),
        )

    def close(self) -> None:
        """Free the arena and remove the shared-memory KV file (no stale /dev/shm)."""
        self._requests.clear()
        if self.device.type == "cuda":
            # Copies in flight (swap-ins, prefetch) read pinned host pages: finish them first.
            torch.cuda.synchronize(self.device)
        self._reclaim_host(block=True)
        self.slots.close()
        self.host_kv.close()
        self.arena.release()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # give the arena back to the device, not to torch's cache
        self._native.clear()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
