"""``aegaeon bench stack``: what the gateway + NATS path adds per token, and how many concurrent
SSE streams one gateway holds.

Added latency is measured side by side in one run: the same greedy requests go (1) through the
real stack over HTTP/SSE and (2) straight into an in-process engine of the same model, and the
token-by-token gaps are compared (stack gap k − engine step k).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from aegaeon.bench.stack_process import StackProcess
from aegaeon.protocol import SamplingParams


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="a running gateway (default: start the embedded stack)")
    parser.add_argument("--models-dir", type=Path, help="models (default: demo models)")
    parser.add_argument("--model", help="model to use (default: the smallest)")
    parser.add_argument("--requests", type=int, default=8, help="sequential latency requests")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--streams", type=int, default=500, help="concurrent SSE streams")
    parser.add_argument("--json", type=Path, help="write the results here")


@dataclass
class StreamTiming:
    """Client-side arrival times of one streamed request's tokens."""

    token_times: list[float]
    ok: bool
    error: str = ""
    sent_at: float = 0.0
    status: int = 0  # HTTP status (0: no response)

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.sent_at if self.token_times else None


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def stream_completion(
    client: httpx.AsyncClient, url: str, model: str, prompt: list[int], max_tokens: int
) -> StreamTiming:
    """One streamed /v1/completions request (token-id prompt, greedy); arrival time per chunk."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    times: list[float] = []
    sent_at = time.perf_counter()
    status = 0
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            status = response.status_code
            if status != 200:
                text = (await response.aread()).decode(errors="replace")
                return StreamTiming([], False, f"HTTP {status}: {text[:200]}", sent_at, status)
            done = False
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return StreamTiming(times, False, str(chunk["error"]), sent_at, status)
                if chunk.get("choices") and chunk["choices"][0].get("text") is not None:
                    times.append(time.perf_counter())
            error = "" if done else "stream ended without [DONE]"
            return StreamTiming(times, done, error, sent_at, status)
    except httpx.HTTPError as exc:
        return StreamTiming(times, False, f"{type(exc).__name__}: {exc}", sent_at, status)


def engine_step_times(
    models_dir: Path, model: str, prompts: list[list[int]], max_tokens: int
) -> list[list[float]]:
    """Per-token step times of the same requests on an in-process engine (batch 1)."""
    import os

    import torch

    from aegaeon.gpu_worker.engine import Engine, EngineConfig

    # The same thread count the stack's worker uses (`serve worker --threads` default), so the
    # difference measured is the path, not the engine's configuration.
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    engine = Engine(EngineConfig(device="cpu"))
    try:
        engine.register_model(model, models_dir / model)
        engine.switch_to(model)
        sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        runs = []
        for i, prompt in enumerate(prompts):
            rid = f"bench-{i}"
            engine.add_request(rid, model, prompt, sampling)
            steps: list[float] = []
            finished = False
            while not finished:
                t0 = time.perf_counter()
                outputs = engine.step([rid])
                steps.append(time.perf_counter() - t0)
                finished = any(o.finish_reason for o in outputs)
            runs.append(steps)
        return runs
    finally:
        engine.close()


def added_latency(stack_runs: list[StreamTiming], engine_runs: list[list[float]]) -> list[float]:
    """Per decode token: stack inter-token gap − the engine's step time for that token."""
    added: list[float] = []
    for timing, steps in zip(stack_runs, engine_runs, strict=False):
        gaps = [b - a for a, b in zip(timing.token_times, timing.token_times[1:], strict=False)]
        added.extend(gap - step for gap, step in zip(gaps, steps[1:], strict=False))
    return added


async def concurrent_streams(url: str, model: str, prompt: list[int], count: int) -> dict:
    """Open ``count`` SSE streams at once; count the ones that completed cleanly."""
    limits = httpx.Limits(max_connections=count + 10, max_keepalive_connections=count + 10)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(
            *(stream_completion(client, url, model, prompt, 4) for _ in range(count))
        )
        elapsed = time.perf_counter() - t0
    errors = [r.error for r in results if not r.ok]
    return {
        "streams": count,
        "completed": count - len(errors),
        "errors": len(errors),
        "first_errors": errors[:3],
        "seconds": elapsed,
    }


async def _measure(args: argparse.Namespace, url: str, models_dir: Path | None) -> dict:
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0)) as client:
        listed = (await client.get(f"{url}/v1/models")).json()["data"]
        model = args.model or _smallest(models_dir, [m["id"] for m in listed])
        prompts = [
            [(7 * i + j) % 200 + 10 for j in range(16 + 4 * i)] for i in range(args.requests)
        ]
        await stream_completion(client, url, model, prompts[0], 4)  # warm: model resident
        stack_runs = [
            await stream_completion(client, url, model, p, args.max_tokens) for p in prompts
        ]
    result: dict = {"model": model, "url": url}
    failed = [r.error for r in stack_runs if not r.ok]
    if failed:
        result["latency_errors"] = failed
    if models_dir is not None:
        engine_runs = engine_step_times(models_dir, model, prompts, args.max_tokens)
        added = added_latency(stack_runs, engine_runs)
        result |= {
            "added_ms_per_token_p50": percentile(added, 0.5) * 1e3,
            "added_ms_per_token_p99": percentile(added, 0.99) * 1e3,
            "engine_step_ms_p50": statistics.median(s for r in engine_runs for s in r[1:]) * 1e3,
            "goal_p50_ms": 1.0,
        }
    result["concurrency"] = await concurrent_streams(url, model, prompts[0][:8], args.streams)
    return result


def _smallest(models_dir: Path | None, names: list[str]) -> str:
    if models_dir is None:
        return sorted(names)[0]

    def size(name: str) -> int:
        return sum(f.stat().st_size for f in (models_dir / name).glob("*.safetensors"))

    return min((n for n in names if (models_dir / n).exists()), key=size)


def _print(result: dict) -> None:
    table = Table(title=f"bench stack — model {result['model']}")
    table.add_column("measure")
    table.add_column("value")
    for key in ("added_ms_per_token_p50", "added_ms_per_token_p99", "engine_step_ms_p50"):
        if key in result:
            table.add_row(key, f"{result[key]:.3f}")
    conc = result["concurrency"]
    table.add_row("concurrent streams completed", f"{conc['completed']} / {conc['streams']}")
    table.add_row("concurrent streams errors", str(conc["errors"]))
    Console().print(table)


def main(args: argparse.Namespace) -> int:
    if args.url:
        result = asyncio.run(_measure(args, args.url.rstrip("/"), args.models_dir))
    else:
        with tempfile.TemporaryDirectory(prefix="aegaeon-bench-") as tmp:
            models_dir = args.models_dir
            if models_dir is None:
                from aegaeon.model_store.demo import create_demo_models

                models_dir = Path(tmp) / "models"
                create_demo_models(models_dir)
            with StackProcess(Path(tmp) / "home", models_dir=models_dir) as stack:
                result = asyncio.run(_measure(args, stack.url, models_dir))
    result["device"] = "cpu"
    _print(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if result["concurrency"]["errors"] == 0 and "latency_errors" not in result else 1
