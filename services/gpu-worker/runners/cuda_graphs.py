"""CUDA graphs of the decode step, captured once per (runner state, KV view, batch bucket, width
bucket) and kept across model switches.

A decode step of a 7B model launches about 1,100 kernels; launched one by one from Python the
step is bound by the CPU (21 ms at batch 1 on an H200, against a 3.4 ms floor for reading the
weights). A graph replays them all in one launch.

The batch is padded to a power of two with copies of its first request (same token, length and
block table: identical rows compute identical K/V and write the same bits to the same rows), and
the blocks read per request to a power of two (positions past a request's length are masked, as
in every decode step). The logits of the real rows are copied out.

**Why a reused graph never reads a stale address.** A graph holds raw device addresses: the
weights, every constant tensor the runner holds, the KV region, its own inputs and outputs. It
is replayed only under a key that pins each of them:

- weights are views into the arena, which stays allocated for the engine's whole life; the key
  holds each weight view's address, shape, strides and dtype. A model switched into the same slot
  with the same layout has the same addresses, so it reuses the graphs with no capture: they read
  what the slot holds now, that model's weights. Another slot or layout is another key;
- constants a bind creates outside the arena (RMS eps, rope frequencies, Qwen3's stacked q/k norm
  weights, Gemma's embedding scale) are keyed by their *value*, and a graph keeps alive the very
  tensors it captured, so the memory it reads is never freed or reused while the graph exists;
- Python scalars that become kernel arguments (head counts, eps, scale, soft caps, the
  activation function) are in the key;
- the KV view is keyed by its region's address and its geometry; the step's inputs (tokens,
  lengths, block tables) and the logits are tensors the graph owns, filled before each replay.

Graphs share one memory pool (one replay at a time: the engine steps on one thread) and are
dropped least recently used past ``MAX_GRAPHS``; ``clear`` (engine close) drops them all.
"""

from __future__ import annotations

import hashlib
import logging
import statistics
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, is_dataclass
from typing import Any

import torch
from aegaeon.gpu_worker.paged_kv import PagedKV, StepInputs

log = logging.getLogger(__name__)

MAX_BATCH = 32
"""Larger batches decode without a graph: the launches are a small share of their step."""
MAX_TOKENS = 1 << 16
"""Largest padded batch × positions read per graph (the gathered K/V of one layer is the largest
buffer in a graph's pool: 1 GiB for a 7B model at 32 × 2,048 in bf16)."""
MIN_POSITIONS = 64
"""The smallest bucket of positions read, so short decodes share a graph."""
MAX_GRAPHS = 128


def _bucket(n: int, least: int = 1) -> int:
    """The next power of two at or above ``n`` (and ``least``)."""
    return max(least, 1 << (n - 1).bit_length())


def _digest(tensor: torch.Tensor) -> str:
    raw = tensor.detach().reshape(-1).contiguous().cpu().view(torch.uint8)
    return hashlib.blake2b(raw.numpy().tobytes(), digest_size=16).hexdigest()


def state_key(runner: Any, in_arena: Callable[[torch.Tensor], bool]) -> tuple[tuple[Any, ...], list[torch.Tensor]]:  # fmt: skip
    """A runner's bound state as a key (see the module docstring), and the tensors outside the
    arena that a graph captured from it must keep alive."""
    parts: list[Any] = [type(runner).__qualname__]
    keep: list[torch.Tensor] = []

    def visit(name: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            if in_arena(value):
                parts.append((name, value.data_ptr(), tuple(value.shape), value.stride(), value.dtype))  # fmt: skip
            else:
                keep.append(value)
                parts.append((name, tuple(value.shape), value.dtype, _digest(value)))
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                visit(f"{name}.{i}", item)
        elif is_dataclass(value) and not isinstance(value, type):
            for field, item in vars(value).items():
                visit(f"{name}.{field}", item)
        elif value is None or isinstance(value, (int, float, str, torch.dtype, torch.device)):
            parts.append((name, value))
        elif callable(value):  # an activation: module-level functions live as long as the process
            parts.append((name, id(value)))
        else:
            raise TypeError(f"no graph key for {type(runner).__name__}.{name} ({type(value).__name__})")  # fmt: skip

    for name, value in vars(runner).items():
        visit(name, value)
    return tuple(parts), keep


def kv_key(kv: PagedKV) -> tuple[Any, ...]:
    return (kv.region.data_ptr(), kv.region.numel(), kv.region.dtype, kv.shape, kv.block_size)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: StepInputs
    logits: torch.Tensor
    keep: tuple[Any, ...]  # the runner's constants and the KV view the graph reads


class DecodeGraphs:
    """Decode steps through captured CUDA graphs where the device and the shapes allow; the
    runner's own ``decode`` elsewhere (the CPU, a large batch or context, the fallback runner)."""

    def __init__(self, device: torch.device, in_arena: Callable[[torch.Tensor], bool], enabled: bool = True, busy: Callable[[], bool] = lambda: False) -> None:  # fmt: skip
        self.device = device
        self.enabled = enabled and device.type == "cuda"
        self._in_arena = in_arena
        self._busy = busy  # another thread issues CUDA calls: a capture now could take them in
        self._failed: set[tuple[Any, ...]] = set()
        self._bound: dict[int, tuple[int, list[torch.Tensor]]] = {}  # runner -> (state id, keep)
        self._state_ids: dict[tuple[Any, ...], int] = {}  # a key of hundreds of parts, hashed once
        self._graphs: OrderedDict[tuple[Any, ...], _Graph] = OrderedDict()
        self._pool = self._new_pool()
        self.captures = 0
        """Graphs captured since start (tests read it: a switch to a same-layout model adds none)."""

    def bound(self, runner: Any) -> None:
        """Note the state a runner was just bound to (call after every ``bind``)."""
        if self.enabled:
            state, keep = state_key(runner, self._in_arena)
            state_id = self._state_ids.setdefault(state, len(self._state_ids))
            self._bound[id(runner)] = (state_id, keep)

    def decode(self, runner: Any, tokens: list[int], lengths: list[int], tables: list[list[int]], kv: PagedKV) -> torch.Tensor:  # fmt: skip
        """The runner's decode step, through a graph where one applies."""
        batch = _bucket(len(tokens))
        width = _bucket(-(-max(lengths) // kv.block_size), MIN_POSITIONS // kv.block_size)
        state = self._bound.get(id(runner))
        too_large = batch > MAX_BATCH or batch * width * kv.block_size > MAX_TOKENS
        if not self.enabled or state is None or too_large:
            return runner.decode(tokens, lengths, tables, kv)
        pad = batch - len(tokens)
        host = kv.step_inputs(
            tokens + tokens[:1] * pad, lengths + lengths[:1] * pad, tables + tables[:1] * pad, width
        )
        key = (state[0], kv_key(kv), batch, width, host.aligned)
        if key in self._failed or (key not in self._graphs and self._busy()):
            return runner.decode(tokens, lengths, tables, kv)  # captured later, when idle
        logits = self._replay(key, runner, kv, host, state[1])
        if logits is None:
            return runner.decode(tokens, lengths, tables, kv)
        return logits[: len(tokens)].clone()  # the next replay overwrites the graph's own

    def _replay(self, key: tuple[Any, ...], runner: Any, kv: PagedKV, host: StepInputs, keep: list[torch.Tensor]) -> torch.Tensor | None:  # fmt: skip
        """Run the graph of ``key`` on ``host``'s values (captured first if new); its logits,
        or None where the capture failed (that key then always runs without a graph)."""
        graph = self._graphs.get(key)
        if graph is None:
            try:
                graph = self._capture(key, runner, kv, host, keep)
            except RuntimeError as exc:  # torch.AcceleratorError is one
                # The failed capture left its pool marked as recording: the next one gets a new
                # pool. Nothing ran in the capture; the warm-up wrote the step's own K/V only.
                log.warning("decode graph capture failed (batch %d, %d positions): %s; "
                            "this shape decodes without a graph", host.tokens.shape[0], host.longest, exc)  # fmt: skip
                self._failed.add(key)
                self._pool = self._new_pool()
                return None
        else:
            self._graphs.move_to_end(key)
            graph.inputs.copy_(host)
        graph.graph.replay()
        return graph.logits

    def _new_pool(self) -> Any:
        return torch.cuda.graph_pool_handle() if self.device.type == "cuda" else None

    def _capture(self, key: tuple[Any, ...], runner: Any, kv: PagedKV, host: StepInputs, keep: list[torch.Tensor]) -> _Graph:  # fmt: skip
        inputs = host.to(self.device)
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            # Kernels chosen and workspaces allocated outside the capture. It writes this
            # step's own K/V rows, the same bits the replay then writes again.
            runner.decode_step(inputs, kv)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the copy thread may pin host pages and queue prefetch copies meanwhile.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            logits = runner.decode_step(inputs, kv)
        self.captures += 1
        captured = self._graphs[key] = _Graph(graph, inputs, logits, (tuple(keep), kv))
        while len(self._graphs) > MAX_GRAPHS:
            self._graphs.popitem(last=False)
        return captured

    def replay_seconds(self, repeats: int = 20) -> dict[tuple[int, int], float]:
        """Median seconds of one replay of each graph by (batch, positions read): a decode
        step's device time alone, without the engine's host work around it (``bench engine``).
        A replay writes its last inputs' K/V rows again: call it only with no request alive."""
        out = {}
        for graph in self._graphs.values():
            times = []
            for _ in range(repeats):
                self._sync()
                start = time.perf_counter()
                graph.graph.replay()
                self._sync()
                times.append(time.perf_counter() - start)
            out[(graph.inputs.tokens.shape[0], graph.inputs.longest)] = statistics.median(times)
        return out

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def clear(self) -> None:
        """Drop every graph (before the arena they read is freed)."""
        self._graphs.clear()
        self._bound.clear()
        self._failed.clear()
        self._state_ids.clear()
