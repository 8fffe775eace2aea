"""``aegaeon top``: a live terminal view of workers, per-model queues, latencies and switches.

It listens on the bus (worker heartbeats, the scheduler's state, switch events) and reads latency
histograms from the gateway's ``/metrics``. The view is built by pure functions from a snapshot,
so it is tested without a terminal.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import time
from collections import deque
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Group
from rich.live import Live
from rich.table import Table

from aegaeon.bus import Bus
from aegaeon.config import BusConfig, local_bus_config
from aegaeon.protocol import Heartbeat, SchedulerState, SwitchDone, WorkerEvent


@dataclass
class Snapshot:
    """Everything the view shows, as last heard."""

    heartbeats: dict[str, Heartbeat] = field(default_factory=dict)
    state: SchedulerState | None = None
    switch_times: deque[float] = field(default_factory=lambda: deque(maxlen=10_000))
    latencies: dict[str, dict[str, float]] = field(default_factory=dict)  # metric → {p50, p99}

    def switches_per_second(self, now: float, window: float = 10.0) -> float:
        return sum(1 for t in self.switch_times if now - t <= window) / window


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
    workers = Table(title="workers", expand=True)
    for column in ("worker", "role", "device", "resident model", "requests", "KV use", "age"):
        workers.add_column(column)
    for beat in sorted(snapshot.heartbeats.values(), key=lambda b: b.worker_id):
        used = 1 - beat.kv_blocks_free / beat.kv_blocks_total if beat.kv_blocks_total else 0.0
        workers.add_row(
            beat.worker_id, beat.role, beat.device, beat.resident_model or "—",
            str(beat.num_requests), f"{used:.0%}", f"{now - beat.time:.1f}s",
        )  # fmt: skip
    queues = Table(title="models", expand=True)
    for column in ("model", "waiting", "running"):
        queues.add_column(column)
    state = snapshot.state
    if state is not None:
        for model in sorted(set(state.queued) | set(state.running)):
            queues.add_row(model, str(state.queued.get(model, 0)), str(state.running.get(model, 0)))
    summary = Table(title="latency and switching", expand=True)
    for column in ("measure", "p50", "p99"):
        summary.add_column(column)
    for label, values in snapshot.latencies.items():
        summary.add_row(label, _ms(values.get("p50")), _ms(values.get("p99")))
    alpha = f"{state.alpha:.2f}" if state and state.alpha is not None else "—"
    policy = state.policy if state else "—"
    summary.add_row("switches/s", f"{snapshot.switches_per_second(time.time()):.2f}", "")
    summary.add_row(f"policy {policy}, α", alpha, "")
    return Group(workers, queues, summary)


def _ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1000:.1f} ms"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gateway", default="http://127.0.0.1:8000", help="gateway base URL")
    parser.add_argument("--interval", type=float, default=1.0, help="refresh period, seconds")
    parser.add_argument("--once", action="store_true", help="print one view and exit")


def top_bus_config() -> BusConfig:
    """The environment's bus, else the one of the ``aegaeon up`` this user runs here."""
    if "AEGAEON_NATS_URL" in os.environ:
        return BusConfig()
    return local_bus_config() or BusConfig()


async def _watch(args: argparse.Namespace) -> None:
    snapshot = Snapshot()
    bus = await Bus.connect(top_bus_config(), name="top")
    subjects = bus.subjects

    async def on_heartbeat(beat: Heartbeat, _msg: object) -> None:
        snapshot.heartbeats[beat.worker_id] = beat

    async def on_state(state: SchedulerState, _msg: object) -> None:
        snapshot.state = state

    async def on_event(event: object, _msg: object) -> None:
        if isinstance(event, SwitchDone):
            snapshot.switch_times.append(time.time())

    await bus.subscribe(subjects.heartbeat, Heartbeat, on_heartbeat)
    await bus.subscribe(subjects.scheduler_state, SchedulerState, on_state)
    await bus.subscribe(subjects.all_worker_events, WorkerEvent, on_event)
    async with httpx.AsyncClient(timeout=2.0) as http:
        with Live(render(snapshot, time.time()), auto_refresh=False) as live:
            while True:
                await asyncio.sleep(args.interval)
                try:
                    text = (await http.get(f"{args.gateway}/metrics")).text
                    for label, metric in (
                        ("TTFT", "aegaeon:time_to_first_token_seconds"),
                        ("TBT", "aegaeon:inter_token_latency_seconds"),
                    ):
                        snapshot.latencies[label] = histogram_quantiles(text, metric)
                except httpx.HTTPError:
                    pass
                live.update(render(snapshot, time.time()), refresh=True)
                if args.once:
                    break
    await bus.close()


def main(args: argparse.Namespace) -> int:
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_watch(args))
    return 0
