"""The engine: explicit memory, model switching, paged KV, preemption and swap, one step at a time.

Single-threaded: the worker shell calls every method from one thread. Created once per process;
a model switch rebinds weights in the arena and never rebuilds anything (DESIGN.md §5).

Where each concern lives::

    engine.py      Engine: memory sizing, models (register, prefetch, switch), requests, stats
    slots.py       the weight slots: what each holds, the background copy, the switch
    stepping.py    step: prefill, decode, sampling
    preemption.py  swap out / in, drop, preempt the newest, KV export / import
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
from aegaeon.gpu_worker.host_kv import HostKVPool
from aegaeon.gpu_worker.kv_cache import SlabAllocator
from aegaeon.gpu_worker.paged_kv import PagedKV
from aegaeon.gpu_worker.requests import (
    EngineStats,
    KVHandle,
    Request,
    SwitchStats,
    TokenOutput,
)
from aegaeon.gpu_worker.runners.cuda_graphs import DecodeGraphs
from aegaeon.gpu_worker.runners.fallback import (
    FallbackRunner,
)
from aegaeon.gpu_worker.runners.gemma import GemmaRunner
from aegaeon.gpu_worker.runners.llama import LlamaRunner
from aegaeon.gpu_worker.slots import WeightSlots
from aegaeon.gpu_worker.stepping import Stepping
from aegaeon.gpu_worker.weights_loader import GEMMA_TYPES, ModelError, ModelSpec, load_spec

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
    cuda_graphs: bool = True  # CUDA: decode steps replay captured graphs (runners/cuda_graphs.py)


class Engine(Stepping):
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
        self._native: dict[str, LlamaRunner] = {}  # one skeleton per architecture (Gemma's too)
        self._fallback = FallbackRunner(self.device, self.dtype)
        self.graphs = DecodeGraphs(
            self.device, self.arena.holds, config.cuda_graphs, self.slots.copy_thread_busy
        )
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

    def unload_model(self, name: str) -> None:
        """Forget a removed model: its weight slot (resident or prefetched, a copy into it
        stopped), its host mapping, its registration. Raises ValueError while requests of it are
        held (their KV and next steps need it)."""
        held = self.request_ids(name)
        if held:
            raise ValueError(f"model {name!r} still has {len(held)} requests here: not unloaded")
        self._forget_weights(name)
        self.specs.pop(name, None)
        self._paged.pop(name, None)

    def release_stale_host_mappings(self) -> list[str]:
        """Unmap (and unpin) host-cache files the node's model-store has evicted or replaced,
        so their memory goes back to it; the next copy of such a model maps its current file."""
        return self.slots.release_stale_mappings()

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

    def pin(self, name: str | None) -> None:
        """Keep ``name``'s weights in a slot once they are there (None: keep none): a model the
        scheduler serves on this instance whenever it can, never evicted by others' switches."""
        self.slots.pinned = name

    def prefetch(self, name: str) -> None:
        """Stage a model's weights in the non-resident slot and wait until they are there."""
        self.start_prefetch(name)
        if self.slots.prefetching == name:
            self.slots.finish_prefetch()

    def weights_loaded(self, name: str) -> tuple[int, int]:
        """(bytes of ``name``'s weights in a slot, its weight bytes): how far its copy is, for a
        waiting request's progress (read from any thread; (0, 0) for a model not registered)."""
        spec = self.specs.get(name)
        if spec is None:
            return 0, 0
        total = spec.index.data_bytes
        return self.slots.copied_bytes(name, total), total

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
            runner_class = GemmaRunner if model_type in GEMMA_TYPES else LlamaRunner
            runner = self._native[model_type] = runner_class(self.device, self.dtype)
        runner.bind(spec.hf_config, views)
        self.graphs.bound(runner)

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
            slot_bytes=self.arena.slot_bytes,
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
        # Every view into the arena goes before the arena: a bound runner, a KV view or a slot
        # view left behind would keep the whole allocation alive after close().
        self.graphs.clear()
        self._native.clear()
        self._paged.clear()
        self._fallback = FallbackRunner(self.device, self.dtype)
        self.arena.release()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # give the arena back to the device, not to torch's cache


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
