"""``aegaeon bench stack``: what the path after the worker (NATS → gateway → SSE → client) adds
per token, and how many concurrent SSE streams one gateway holds.

Added latency per token = the client's receive time − the worker's publish stamp of the same
token (``TokenBatch.sent_at``, the same host's wall clock). The bench reads the stamps as a
second subscriber to the gateway's token subject on NATS (it sees the same messages as the
gateway) and pairs them with the client's tokens by (request id, token index). The requests ask
for logprobs, so every token comes in a chunk that lists it, text or not yet (the last chunk,
empty, only carries the finish reason); a request whose tokens are not exactly ``max_tokens``
cannot be paired by index and is left out, counted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from aegaeon.bench.client import StreamTiming, percentile, stream_completion
from aegaeon.bench.stack_process import StackProcess
from aegaeon.bench.watch import Watcher
from aegaeon.children import exit_on_sigterm
from aegaeon.protocol import TokenBatch
from aegaeon.subjects import Subjects

Stamps = dict[tuple[str, int], float]
"""(request id, token index) → the worker's publish time of that token."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="a running gateway (default: start the embedded stack)")
    parser.add_argument("--nats-url", help="with --url: the stack's NATS (to read worker stamps)")
    parser.add_argument(
        "--prefix", default="aegaeon", help="with --url: the stack's AEGAEON_PREFIX"
    )
    parser.add_argument("--models-dir", type=Path, help="models (default: demo models)")
    parser.add_argument("--model", help="model to use (default: the smallest)")
    parser.add_argument("--requests", type=int, default=16, help="sequential latency requests")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--streams", type=int, default=500, help="concurrent SSE streams")
    parser.add_argument("--json", type=Path, help="write the results here")


def record_stamps(batch: TokenBatch, stamps: Stamps) -> None:
    """Note the worker's stamp of every token in ``batch`` (the first stamp of a token wins: a
    recovery re-run may publish an index again)."""
    for event in batch.events:
        for offset in range(len(event.token_ids)):
            stamps.setdefault((event.request_id, event.start + offset), batch.sent_at)


def pair_added_latency(
    runs: Iterable[StreamTiming], stamps: Stamps, max_tokens: int
) -> tuple[list[float], Counter]:
    """Per token: client receive time − worker stamp of the same (request, index); and why
    requests or tokens were left out."""
    added: list[float] = []
    left_out: Counter = Counter()
    for run in runs:
        if not run.ok:
            left_out["request not finished"] += 1
            continue
        if len(run.wall_times) != max_tokens:
            left_out["tokens != max_tokens"] += 1
            continue
        for index, received in enumerate(run.wall_times):
            sent = stamps.get((run.request_id, index))
            if not sent:  # no stamp seen, or a worker that does not stamp (sent_at 0)
                left_out["token without a worker stamp"] += 1
                continue
            added.append(received - sent)
    return added, left_out


def stamp_watcher(nats_url: str, subjects: Subjects, stamps: Stamps) -> Watcher:
    """A second subscriber to every gateway's token subject, collecting worker stamps."""
    return Watcher(nats_url, subjects.tokens("*"), TokenBatch, lambda b: record_stamps(b, stamps))


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


async def _measure(
    args: argparse.Namespace, url: str, models_dir: Path | None, nats_url: str | None,
    subjects: Subjects,
) -> dict:  # fmt: skip
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0)) as client:
        listed = (await client.get(f"{url}/v1/models")).json()["data"]
        model = args.model or _smallest(models_dir, [m["id"] for m in listed])
        prompts = [
            [(7 * i + j) % 200 + 10 for j in range(16 + 4 * i)] for i in range(args.requests)
        ]
        await stream_completion(client, url, model, prompts[0], 4)  # warm: model resident
        result: dict = {"model": model, "url": url, "max_tokens": args.max_tokens}
        if nats_url is None:
            stack_runs = [await stream_completion(client, url, model, p, args.max_tokens,
                                                  every_token=True) for p in prompts]  # fmt: skip
            result["added_latency"] = "not measured: give --nats-url to read the worker stamps"
        else:
            stamps: Stamps = {}
            async with stamp_watcher(nats_url, subjects, stamps):
                stack_runs = [await stream_completion(client, url, model, p, args.max_tokens,
                                                      every_token=True) for p in prompts]  # fmt: skip
                await asyncio.sleep(0.2)  # the last batch has reached this subscriber too
            added, left_out = pair_added_latency(stack_runs, stamps, args.max_tokens)
            result |= {
                "added_ms_per_token_p50": percentile(added, 0.5) * 1e3,
                "added_ms_per_token_p99": percentile(added, 0.99) * 1e3,
                "added_ms_per_token_mean": sum(added) / len(added) * 1e3 if added else None,
                "tokens_paired": len(added),
                "left_out": dict(left_out),
                "goal_p50_ms": 1.0,
            }
    failed = [r.error for r in stack_runs if not r.ok]
    if failed:
        result["latency_errors"] = failed
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
    for key in ("added_ms_per_token_p50", "added_ms_per_token_p99", "added_ms_per_token_mean",
                "tokens_paired", "left_out", "added_latency"):  # fmt: skip
        if key in result:
            value = result[key]
            table.add_row(key, f"{value:.3f}" if isinstance(value, float) else str(value))
    conc = result["concurrency"]
    table.add_row("concurrent streams completed", f"{conc['completed']} / {conc['streams']}")
    table.add_row("concurrent streams errors", str(conc["errors"]))
    Console().print(table)


def main(args: argparse.Namespace) -> int:
    exit_on_sigterm()
    if args.url:
        subjects = Subjects(args.prefix)
        result = asyncio.run(_measure(args, args.url.rstrip("/"), args.models_dir, args.nats_url, subjects))  # fmt: skip
    else:
        with tempfile.TemporaryDirectory(prefix="aegaeon-bench-") as tmp:
            models_dir = args.models_dir
            if models_dir is None:
                from aegaeon.model_store.demo import create_demo_models

                models_dir = Path(tmp) / "models"
                create_demo_models(models_dir)
            with StackProcess(Path(tmp) / "home", models_dir=models_dir) as stack:
                result = asyncio.run(_measure(args, stack.url, models_dir, stack.nats_url, stack.subjects))  # fmt: skip
    result["device"] = "cpu"
    _print(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if result["concurrency"]["errors"] == 0 and "latency_errors" not in result else 1
