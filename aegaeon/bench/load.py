"""``aegaeon bench load``: many concurrent streaming clients for a fixed time.

Every request ends in exactly one bucket (``aegaeon.bench.client.classify``): finished (a finish
reason, then ``[DONE]``), refused explicitly (HTTP 429 / 503, or an error event in the stream),
or lost (anything else: a transport error, a stream that broke off or hung past the client
timeout, a stream without a finish reason). Lost must be 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from aegaeon.bench.client import StreamTiming, classify, percentile, stream_completion
from aegaeon.bench.stack_process import StackProcess


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="a running gateway (default: start the embedded stack)")
    parser.add_argument("--models-dir", type=Path, help="models (default: demo models)")
    parser.add_argument("--model", default="demo-llama", help="model to load (the smallest demo)")
    parser.add_argument("--clients", type=int, default=500, help="concurrent streaming clients")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--client-timeout", type=float, default=120.0)
    parser.add_argument("--json", type=Path, help="write the results here")


async def client_loop(
    client: httpx.AsyncClient, url: str, model: str, max_tokens: int, until: float, index: int
) -> list[StreamTiming]:
    """One client: request after request until the deadline; honours Retry-After briefly."""
    results = []
    prompt = [(index * 13 + j) % 200 + 10 for j in range(8)]
    while time.perf_counter() < until:
        result = await stream_completion(client, url, model, prompt, max_tokens)
        results.append(result)
        if result.status in (429, 503):
            await asyncio.sleep(0.5)
    return results


async def run_load(args: argparse.Namespace, url: str) -> dict:
    limits = httpx.Limits(max_connections=args.clients + 10, max_keepalive_connections=args.clients)
    timeout = httpx.Timeout(args.client_timeout)
    started = time.perf_counter()
    until = started + args.duration
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        per_client = await asyncio.gather(
            *(client_loop(client, url, args.model, args.max_tokens, until, i)
              for i in range(args.clients))
        )  # fmt: skip
    elapsed = time.perf_counter() - started
    results = [r for rs in per_client for r in rs]
    buckets = Counter(classify(r) for r in results)
    ttfts = [r.ttft for r in results if r.ok and r.ttft is not None]
    lost_examples = [r.error for r in results if classify(r) == "lost"][:5]
    return {
        "clients": args.clients,
        "duration_s": elapsed,
        "model": args.model,
        "requests": len(results),
        "accepted": sum(1 for r in results if r.status == 200),
        "finished": buckets["finished"],
        "refused": buckets["refused"],
        "lost": buckets["lost"],
        "lost_examples": lost_examples,
        "ttft_p50_s": percentile(ttfts, 0.5),
        "ttft_p99_s": percentile(ttfts, 0.99),
        "finished_per_s": buckets["finished"] / elapsed,
    }


def _print(result: dict) -> None:
    table = Table(title=f"bench load — {result['clients']} clients, {result['duration_s']:.0f} s")
    table.add_column("measure")
    table.add_column("value")
    for key in ("requests", "accepted", "finished", "refused", "lost", "finished_per_s",
                "ttft_p50_s", "ttft_p99_s"):  # fmt: skip
        value = result[key]
        table.add_row(key, f"{value:.3f}" if isinstance(value, float) else str(value))
    Console().print(table)


def main(args: argparse.Namespace) -> int:
    if args.url:
        result = asyncio.run(run_load(args, args.url.rstrip("/")))
    else:
        with tempfile.TemporaryDirectory(prefix="aegaeon-load-") as tmp:
            models_dir = args.models_dir
            if models_dir is None:
                from aegaeon.model_store.demo import create_demo_models

                models_dir = Path(tmp) / "models"
                create_demo_models(models_dir)
            with StackProcess(Path(tmp) / "home", models_dir=models_dir) as stack:
                result = asyncio.run(run_load(args, stack.url))
    result["device"] = "cpu"
    _print(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if result["lost"] == 0 else 1
