"""``aegaeon serve scheduler``: the scheduler process (one per deployment)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import logging
from typing import Any

from aegaeon.scheduler.policies import POLICIES
from aegaeon.scheduler.policies.base import ModelSpec, Slo

from aegaeon.bus import Bus, connect_redis
from aegaeon.config import BusConfig
from aegaeon.metrics import serve_metrics
from aegaeon.runtime import run_process
from aegaeon.telemetry import setup_tracing, shutdown_tracing

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", default="aegaeon", choices=sorted(POLICIES))
    parser.add_argument("--slo-ttft", type=float, default=10.0, help="TTFT SLO, seconds")
    parser.add_argument("--slo-tbt", type=float, default=0.1, help="TBT SLO, seconds")
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
    """Connect, serve until ``stop``, then drain NATS and close Redis (in reverse order)."""
    from aegaeon.scheduler.service import SchedulerService
    from aegaeon.scheduler.store import RequestStore

    serve_metrics(args.metrics_port)
    setup_tracing("scheduler")
    bus_config = BusConfig()
    async with contextlib.AsyncExitStack() as stack:
        bus = await Bus.connect(bus_config, name="scheduler")
        stack.push_async_callback(bus.close)
        redis = connect_redis(bus_config)
        stack.push_async_callback(redis.aclose)
        service = SchedulerService(
            scheduler_config(args),
            bus,
            RequestStore(redis, bus_config.prefix),
            estimator_factory(args.profile),
        )
        await service.run(stop)
    shutdown_tracing()


def run_scheduler_process(args: argparse.Namespace) -> int:
    """Run the scheduler until SIGINT/SIGTERM; non-zero exit when it crashes."""
    return run_process("scheduler", lambda stop: serve(args, stop))


def main(args: argparse.Namespace) -> int:
    return run_scheduler_process(args)
