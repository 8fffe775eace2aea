"""Replay a trace against a gateway over HTTP/SSE (the real client path), timing every token.

Each request is sent at its traced arrival (relative to the replay's start) as a streamed
``/v1/completions`` with a token-id prompt, greedy, ``max_tokens`` = the traced output length.
Requests still open ``drain_s`` after the last arrival are abandoned (the client disconnects,
which cancels them) and count as unfinished.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx
from tqdm import tqdm

from aegaeon.bench.client import StreamTiming, stream_completion
from aegaeon.bench.serve_trace import prompt_ids, to_record
from aegaeon.slo_metrics import RequestRecord
from aegaeon.workload import TraceRequest


@dataclass
class Replay:
    """What one replay produced: records on the trace's clock, and why requests failed."""

    records: list[RequestRecord]
    errors: Counter = field(default_factory=Counter)
    wall_s: float = 0.0


def error_kind(timing: StreamTiming | None) -> str | None:
    """A short bucket for a failed request (None when it finished)."""
    if timing is None:
        return "abandoned at drain"
    if timing.ok:
        return None
    if timing.status and timing.status != 200:
        return f"HTTP {timing.status}"
    return timing.error.split(":")[0][:60] or "stream broke"


async def _one(
    client: httpx.AsyncClient, url: str, request: TraceRequest, origin: float, vocab: int,
    seed: int, bar: tqdm,
) -> StreamTiming:  # fmt: skip
    await asyncio.sleep(max(0.0, origin + request.arrival - time.perf_counter()))
    prompt = prompt_ids(request, vocab, seed)
    try:
        return await stream_completion(client, url, request.model, prompt, request.output_len,
                                       every_token=True)  # fmt: skip
    finally:
        bar.update(1)


async def replay(
    url: str, trace: Sequence[TraceRequest], *, vocab: int, seed: int = 0, drain_s: float = 60.0,
    label: str = "",
) -> Replay:  # fmt: skip
    """Send every request of ``trace`` at its arrival; gather client-side token times."""
    limits = httpx.Limits(max_connections=len(trace) + 8, max_keepalive_connections=32)
    horizon = (trace[-1].arrival if trace else 0.0) + drain_s
    started = time.perf_counter()
    with tqdm(total=len(trace), desc=label, unit="req", leave=False) as bar:
        async with httpx.AsyncClient(timeout=httpx.Timeout(horizon + 30), limits=limits) as client:
            origin = time.perf_counter()
            tasks = [
                asyncio.create_task(_one(client, url, r, origin, vocab, seed, bar)) for r in trace
            ]
            done, pending = await asyncio.wait(tasks, timeout=horizon)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
    result = Replay([], wall_s=time.perf_counter() - started)
    for request, task in zip(trace, tasks, strict=True):
        timing = task.result() if task in done else None
        kind = error_kind(timing)
        if kind is not None:
            result.errors[kind] += 1
        if timing is None:
            result.records.append(_abandoned(request))
        else:
            result.records.append(
                to_record(request, timing.sent_at, timing.token_times, timing.ok, origin)
            )
    return result


def _abandoned(request: TraceRequest) -> RequestRecord:
    return RequestRecord(request.request_id, request.model, request.arrival, request.output_len,
                         [], finished=False)  # fmt: skip


async def isolated_latency(
    url: str, model: str, prompt_len: int, output_len: int, vocab: int, repeats: int = 3
) -> tuple[list[float], list[float]]:
    """(TTFTs, mean TBTs) of ``model`` serving one request alone, warm: ``repeats`` requests
    after one warm-up request (which makes the model resident), in the order measured."""
    probe = TraceRequest("isolated", model, 0.0, prompt_len, output_len)
    prompt = prompt_ids(probe, vocab)
    ttfts, tbts = [], []
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0)) as client:
        await stream_completion(client, url, model, prompt, 4)
        for _ in range(repeats):
            timing = await stream_completion(client, url, model, prompt, output_len,
                                             every_token=True)  # fmt: skip
            times = timing.token_times
            if not timing.ok or len(times) < 2:
                raise RuntimeError(f"isolated request to {model} failed: {timing.error}")
            ttfts.append(times[0] - timing.sent_at)
            tbts.append((times[-1] - times[0]) / (len(times) - 1))
    return ttfts, tbts


async def warm_up(url: str, models: Sequence[str], vocab: int) -> dict[str, str]:
    """One short request per model, in turn (first loads are slow: host cache, first kernels);
    returns model → error for any that failed."""
    failures = {}
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0)) as client:
        for model in models:
            prompt = prompt_ids(TraceRequest("warm", model, 0.0, 16, 2), vocab)
            timing = await stream_completion(client, url, model, prompt, 2)
            if not timing.ok:
                failures[model] = timing.error
    return failures
