"""``aegaeon serve scheduler``: a scheduler process. Several may run: each stands by until it holds
the leader lease in Redis, and only the holder schedules (``leadership.py``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import logging
import socket
import time
from typing import TYPE_CHECKING, Any

from aegaeon.scheduler.locality import DEFAULT_FETCH_BYTES_PER_S
from aegaeon.scheduler.policies import POLICIES
from aegaeon.scheduler.policies.base import ModelSpec, Slo

from aegaeon import metrics
from aegaeon.bus import Bus, connect_redis
from aegaeon.config import BusConfig
from aegaeon.metrics import serve_metrics
from aegaeon.priority import DEFAULT_MAX_WAIT_S
from aegaeon.runtime import run_process
from aegaeon.state import Keys
from aegaeon.telemetry import setup_tracing, shutdown_tracing

if TYPE_CHECKING:
    from aegaeon.scheduler.leadership import RunTerm

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", default="aegaeon", choices=sorted(POLICIES))
    parser.add_argument("--slo-ttft", type=float, default=10.0, help="TTFT SLO, seconds")
    parser.add_argument("--slo-tbt", type=float, default=0.1, help="TBT SLO, seconds")
    parser.add_argument(
        "--max-wait", type=float, default=DEFAULT_MAX_WAIT_S,
        help="seconds a request may wait for its first token before it goes ahead of every "
             "priority class (no class starves another; with one class nothing changes; "
             f"default {DEFAULT_MAX_WAIT_S:g})",
    )  # fmt: skip
    parser.add_argument("--profile", default=None, help="estimator profile JSON (aegaeon profile)")
    parser.add_argument(
        "--heartbeat-timeout", type=float, default=3.0, help="seconds of silence = worker dead"
    )
    parser.add_argument("--max-queue", type=int, default=1024, help="requests waiting before 503")
    parser.add_argument(
        "--policy-option", action="append", default=[], metavar="KEY=VALUE",
        help="passed to the policy's constructor, e.g. quota_s=0.25 (value read as JSON if it can)",
    )  # fmt: skip
    parser.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port")
    parser.add_argument(
        "--turn-timeout", type=float, default=300.0, help="seconds past a turn's quota to give up"
    )
    parser.add_argument(
        "--fetch-gb-per-s", type=float, default=DEFAULT_FETCH_BYTES_PER_S / 1e9,
        help="how fast a node's model-store reads weights it does not cache (GB/s): placement "
             "weighs that fetch once model-stores report their caches (default: a local NVMe disk)",
    )  # fmt: skip
    parser.add_argument(
        "--scheduler-id", default=socket.gethostname(),
        help="names this scheduler in the leader lease and its log (default: the host name)",
    )  # fmt: skip
    parser.add_argument(
        "--lease-ttl", type=float, default=0.0,
        help="seconds the leader lease lasts unless renewed: a standby takes over about this "
             "long after the leader dies (aegaeon up --schedulers 2 and Kubernetes use 3). "
             "0, the default: this is the only scheduler; it schedules at once, without a "
             "lease, and keeps its queue through a Redis outage of any length",
    )  # fmt: skip
    parser.add_argument(
        "--lease-renew", type=float, default=0.5,
        help="seconds between the leader's renews (and a standby's attempts to take the lease)",
    )  # fmt: skip


def estimator_factory(profile: str | None) -> Any:
    """``load_estimator(profile, models)`` from the estimators module, once it exists."""
    try:
        estimators = importlib.import_module("aegaeon.scheduler.estimators")
    except ModuleNotFoundError:
        return None

    def build(models: dict[str, ModelSpec]) -> Any:
        return estimators.load_estimator(profile, models)

    return build


def scheduler_config(args: argparse.Namespace) -> Any:
    from aegaeon.scheduler.service import SchedulerConfig

    return SchedulerConfig(
        policy=args.policy,
        slo=Slo(ttft_s=args.slo_ttft, tbt_s=args.slo_tbt),
        heartbeat_timeout_s=args.heartbeat_timeout,
        max_queue=args.max_queue,
        turn_timeout_s=args.turn_timeout,
        fetch_bytes_per_s=args.fetch_gb_per_s * 1e9,
        max_wait_s=args.max_wait,
        policy_options=policy_options(args.policy_option),
    )


def policy_options(pairs: list[str]) -> dict[str, Any]:
    """``["quota_s=0.25", "mode=fast"]`` → ``{"quota_s": 0.25, "mode": "fast"}``."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--policy-option wants KEY=VALUE, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


async def serve(args: argparse.Namespace, stop: asyncio.Event) -> None:
    """Connect, stand by, schedule while holding the leader lease, until ``stop``; then drain
    NATS and close Redis (in reverse order)."""
    from aegaeon.scheduler.leadership import Leadership, RedisLease
    from aegaeon.scheduler.lease import LeaseClock

    clock = None
    if args.lease_ttl:  # a lease only where a standby may take over
        try:
            clock = LeaseClock.of(args.lease_ttl, args.lease_renew)
        except ValueError as exc:
            raise SystemExit(f"aegaeon serve scheduler: {exc}") from None
    serve_metrics(args.metrics_port)
    setup_tracing("scheduler")
    bus_config = BusConfig()
    async with contextlib.AsyncExitStack() as stack:
        bus = await Bus.connect(bus_config, name="scheduler")
        stack.push_async_callback(bus.close)
        redis = connect_redis(bus_config)
        stack.push_async_callback(redis.aclose)
        if clock is None:
            await sole_scheduler(args, bus, redis, bus_config.prefix, stop)
        else:
            lease = RedisLease(redis, Keys(bus_config.prefix).scheduler_leader, clock.ttl_ms)
            lead = term_runner(args, bus, redis, bus_config.prefix)
            await Leadership(lease, args.scheduler_id, clock, lead).run(stop)
    shutdown_tracing()


async def sole_scheduler(args: argparse.Namespace, bus: Bus, redis: Any, prefix: str,
                         stop: asyncio.Event) -> None:  # fmt: skip
    """The only scheduler: no lease to hold and nothing to fence, so a Redis outage only delays
    its writes (stepping down would hand the queue to nobody)."""
    from aegaeon.scheduler.service import SchedulerService
    from aegaeon.scheduler.store import RequestStore

    service = SchedulerService(scheduler_config(args), bus, RequestStore(redis, prefix),
                               estimator_factory(args.profile))  # fmt: skip
    metrics.SCHEDULER_IS_LEADER.set(1)
    await service.run(stop)


def term_runner(args: argparse.Namespace, bus: Bus, redis: Any, prefix: str) -> RunTerm:
    """What a scheduler does while it leads: a fresh service over the term's fenced bus and
    store (the queue resumed from Redis, as after a restart), until the term ends."""
    from aegaeon.scheduler.fencing import FencedBus, FencedStore
    from aegaeon.scheduler.leadership import Term
    from aegaeon.scheduler.service import SchedulerService

    async def lead(term: Term, term_stop: asyncio.Event) -> None:
        service = SchedulerService(
            scheduler_config(args),
            FencedBus(bus, term.leads, term.epoch),
            FencedStore(redis, prefix, term.leads),
            estimator_factory(args.profile),
        )
        announce = asyncio.create_task(announce_ready(service.ready, term.taken_at))
        try:
            await service.run(term_stop)
        finally:
            announce.cancel()

    return lead


async def announce_ready(ready: asyncio.Event, taken_at: float) -> None:
    """Log when the new leader schedules: the queue of the previous one is re-admitted."""
    await ready.wait()
    log.info("leading: scheduling %.2f s after taking the lease", time.monotonic() - taken_at)


def run_scheduler_process(args: argparse.Namespace) -> int:
    """Run the scheduler until SIGINT/SIGTERM; non-zero exit when it crashes."""
    return run_process("scheduler", lambda stop: serve(args, stop))


def main(args: argparse.Namespace) -> int:
    return run_scheduler_process(args)
