"""``aegaeon bench load``: many concurrent streaming clients for a fixed time.

Every request ends in exactly one bucket (``aegaeon.bench.client.classify``): finished (a finish
reason, then ``[DONE]``), refused explicitly (HTTP 429 / 503, or an error event in the stream),
or lost (anything else: a transport error, a stream that broke off or hung past the client
timeout, a stream without a finish reason). Lost must be 0.

``--greedy-unread N``: the stack runs with API keys, and besides the clients (their own key) one
"greedy" key opens N long streams it never reads. Its per-key share of the gateway's slots
(``AEGAEON_MAX_IN_FLIGHT_PER_KEY``, a quarter by default) bounds what it holds: the clients'
requests must still be served (their TTFT is reported), and none lost.
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
from aegaeon.children import exit_on_sigterm


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="a running gateway (default: start the embedded stack)")
    parser.add_argument("--models-dir", type=Path, help="models (default: demo models)")
    parser.add_argument("--model", default="demo-llama", help="model to load (the smallest demo)")
    parser.add_argument("--clients", type=int, default=500, help="concurrent streaming clients")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--client-timeout", type=float, default=120.0)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--greedy-unread", type=int, default=0, metavar="N",
                        help="also hold N never-read streams under a 'greedy' API key "
                             "(embedded stack only)")  # fmt: skip
    parser.add_argument("--greedy-max-tokens", type=int, default=256,
                        help="tokens each greedy stream asks for")  # fmt: skip


CLIENT_KEY, GREEDY_KEY = "sk-bench-clients", "sk-bench-greedy"


def write_keys(path: Path) -> Path:
    """Two keys: the clients' (free to use every slot) and the greedy one (the default share)."""
    from aegaeon.gateway.auth import hash_key

    keys = [{"name": "clients", "sha256": hash_key(CLIENT_KEY), "max_in_flight": 1 << 20},
            {"name": "greedy", "sha256": hash_key(GREEDY_KEY)}]  # fmt: skip
    path.write_text(json.dumps({"keys": keys}))
    return path


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def hold_unread(url: str, model: str, count: int, max_tokens: int, until: float) -> dict:
    """``count`` streams under the greedy key whose bodies are never read, held until ``until``:
    how many the gateway took (200) and how many it refused (429/503)."""
    outcome: Counter[str] = Counter()
    body = {"model": model, "prompt": [11, 12, 13, 14], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "ignore_eos": True}  # fmt: skip
    limits = httpx.Limits(max_connections=count + 10)
    async with httpx.AsyncClient(timeout=httpx.Timeout(30.0, read=None), limits=limits) as client:

        async def one() -> None:
            try:
                async with client.stream("POST", f"{url}/v1/completions", json=body,
                                         headers=bearer(GREEDY_KEY)) as response:  # fmt: skip
                    status = response.status_code
                    outcome["opened" if status == 200 else "refused" if status in (429, 503)
                            else "other"] += 1  # fmt: skip
                    if status == 200:
                        await asyncio.sleep(max(0.0, until - time.perf_counter()))
            except httpx.HTTPError:
                outcome["other"] += 1

        await asyncio.gather(*(one() for _ in range(count)))
    return {"greedy_unread_asked": count, "greedy_opened": outcome["opened"],
            "greedy_refused": outcome["refused"], "greedy_other": outcome["other"]}  # fmt: skip


async def client_loop(
    client: httpx.AsyncClient, url: str, model: str, max_tokens: int, until: float, index: int,
    headers: dict[str, str] | None = None,
) -> list[StreamTiming]:  # fmt: skip
    """One client: request after request until the deadline; honours Retry-After briefly."""
    results = []
    prompt = [(index * 13 + j) % 200 + 10 for j in range(8)]
    while time.perf_counter() < until:
        result = await stream_completion(client, url, model, prompt, max_tokens, headers)
        results.append(result)
        if result.status in (429, 503):
            await asyncio.sleep(0.5)
    return results


async def run_load(args: argparse.Namespace, url: str) -> dict:
    limits = httpx.Limits(max_connections=args.clients + 10, max_keepalive_connections=args.clients)
    timeout = httpx.Timeout(args.client_timeout)
    started = time.perf_counter()
    until = started + args.duration
    greedy = args.greedy_unread
    headers = bearer(CLIENT_KEY) if greedy else None
    held = asyncio.create_task(
        hold_unread(url, args.model, greedy, args.greedy_max_tokens, until)
    ) if greedy else None  # fmt: skip
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        per_client = await asyncio.gather(
            *(client_loop(client, url, args.model, args.max_tokens, until, i, headers)
              for i in range(args.clients))
        )  # fmt: skip
    greedy_result = await held if held is not None else {}
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
        **greedy_result,
    }


def _print(result: dict) -> None:
    table = Table(title=f"bench load — {result['clients']} clients, {result['duration_s']:.0f} s")
    table.add_column("measure")
    table.add_column("value")
    keys = ["requests", "accepted", "finished", "refused", "lost", "finished_per_s",
            "ttft_p50_s", "ttft_p99_s"]  # fmt: skip
    keys += [k for k in result if k.startswith("greedy_")]
    for key in keys:
        value = result[key]
        table.add_row(key, f"{value:.3f}" if isinstance(value, float) else str(value))
    Console().print(table)


def main(args: argparse.Namespace) -> int:
    exit_on_sigterm()
    if args.url and args.greedy_unread:
        raise SystemExit("bench load: --greedy-unread runs on the embedded stack (no --url)")
    if args.url:
        result = asyncio.run(run_load(args, args.url.rstrip("/")))
    else:
        with tempfile.TemporaryDirectory(prefix="aegaeon-load-") as tmp:
            models_dir = args.models_dir
            if models_dir is None:
                from aegaeon.model_store.demo import create_demo_models

                models_dir = Path(tmp) / "models"
                create_demo_models(models_dir)
            env = {}
            if args.greedy_unread:
                env["AEGAEON_API_KEYS_FILE"] = str(write_keys(Path(tmp) / "keys.json"))
            with StackProcess(Path(tmp) / "home", models_dir=models_dir, env=env) as stack:
                result = asyncio.run(run_load(args, stack.url))
    result["device"] = "cpu"
    _print(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if result["lost"] == 0 else 1
