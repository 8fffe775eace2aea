"""``aegaeon top``: a live terminal view of workers, per-model queues, latencies and switches.

It polls the gateway: the runtime view (``GET /v1/aegaeon/runtime``: workers, queues, α, recent
switches, built by :mod:`aegaeon.runtime_view`) and the latency histograms of ``/metrics``. The
view is drawn by pure functions from those documents, so it is tested without a terminal.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Group
from rich.live import Live
from rich.table import Table

from aegaeon.runtime_view import switches_per_second


@dataclass
class Snapshot:
    """Everything the view shows, as last fetched (``runtime``: None until the gateway answers;
    ``error``: why the last fetch failed)."""

    runtime: dict[str, Any] | None = None
    latencies: dict[str, dict[str, float]] = field(default_factory=dict)  # metric → {p50, p99}
    error: str | None = None


def histogram_quantiles(metrics_text: str, name: str) -> dict[str, float]:
    """p50 and p99 of a Prometheus histogram (all labels summed), by linear bucket interpolation."""
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        if family.name != name:
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                bound = float(sample.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
    if not buckets or buckets.get(float("inf"), 0.0) == 0:
        return {}
    bounds = sorted(buckets)
    total = buckets[float("inf")]
    result = {}
    for label, q in (("p50", 0.5), ("p99", 0.99)):
        target, previous_bound, previous_count = q * total, 0.0, 0.0
        for bound in bounds:
            if buckets[bound] >= target:
                if bound == float("inf"):
                    result[label] = previous_bound
                else:
                    span = buckets[bound] - previous_count or 1.0
                    frac = (target - previous_count) / span
                    result[label] = previous_bound + frac * (bound - previous_bound)
                break
            previous_bound, previous_count = bound, buckets[bound]
    return result


def render(snapshot: Snapshot, now: float) -> Group:
    """The whole view for one refresh."""
    runtime = snapshot.runtime or {"workers": [], "models": [], "recent": [], "scheduler": {}}
    workers = Table(title="workers", expand=True)
    for column in ("worker", "node", "role", "device", "resident model", "requests", "KV use", "age"):  # fmt: skip
        workers.add_column(column)
    for w in runtime["workers"]:
        workers.add_row(
            w["worker_id"], w["node"], w["role"], w["device"], w["resident_model"] or "—",
            str(w["requests"]), f"{w['kv_usage']:.0%}", f"{w['age_s']:.1f}s",
        )  # fmt: skip
    queues = Table(title="models", expand=True)
    for column in ("model", "state", "class", "pin", "waiting", "running", "resident on"):
        queues.add_column(column)
    for m in runtime["models"]:
        queues.add_row(
            m["model"], m.get("state") or "—", m.get("priority") or "—", str(m.get("pin") or "—"),
            str(m["queued"]), str(m["running"]), ", ".join(m["resident_on"]) or "—",
        )  # fmt: skip
    summary = Table(title="latency and switching", expand=True)
    for column in ("measure", "p50", "p99"):
        summary.add_column(column)
    for label, values in snapshot.latencies.items():
        summary.add_row(label, _ms(values.get("p50")), _ms(values.get("p99")))
    scheduler = runtime["scheduler"]
    alpha = f"{scheduler['alpha']:.2f}" if scheduler.get("alpha") is not None else "—"
    summary.add_row("switches/s", f"{switches_per_second(runtime['recent'], now):.2f}", "")
    summary.add_row(f"policy {scheduler.get('policy') or '—'}, α", alpha, "")
    parts: list[Any] = [workers, queues, summary]
    if snapshot.error:
        parts.append(f"[red]gateway: {snapshot.error}[/red]")
    return Group(*parts)


def _ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1000:.1f} ms"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gateway", default="http://127.0.0.1:8000", help="gateway base URL")
    parser.add_argument("--api-key", default=os.environ.get("AEGAEON_API_KEY"),
                        help="a key, when the gateway has keys (default: $AEGAEON_API_KEY)")  # fmt: skip
    parser.add_argument("--interval", type=float, default=1.0, help="refresh period, seconds")
    parser.add_argument("--once", action="store_true", help="print one view and exit")


LATENCIES = (("TTFT", "aegaeon:time_to_first_token_seconds"),
             ("TBT", "aegaeon:inter_token_latency_seconds"))  # fmt: skip


async def refresh(http: httpx.AsyncClient, snapshot: Snapshot) -> None:
    """Fetch the runtime view and the latency histograms into ``snapshot``."""
    try:
        response = await http.get("/v1/aegaeon/runtime")
        response.raise_for_status()
        snapshot.runtime, snapshot.error = response.json(), None
        text = (await http.get("/metrics")).text
        for label, metric in LATENCIES:
            snapshot.latencies[label] = histogram_quantiles(text, metric)
    except httpx.HTTPError as exc:
        snapshot.error = str(exc) or type(exc).__name__


async def _watch(args: argparse.Namespace) -> None:
    snapshot = Snapshot()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(base_url=args.gateway, headers=headers, timeout=2.0) as http:
        await refresh(http, snapshot)
        with Live(render(snapshot, time.time()), auto_refresh=False) as live:
            while not args.once:
                await asyncio.sleep(args.interval)
                await refresh(http, snapshot)
                live.update(render(snapshot, time.time()), refresh=True)


def main(args: argparse.Namespace) -> int:
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_watch(args))
    return 0
