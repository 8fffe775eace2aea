"""``aegaeon serve worker``: one gpu-worker process (one per accelerator; the CPU counts as one)."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket

import redis.asyncio as aioredis

from aegaeon.bus import Bus
from aegaeon.config import BusConfig
from aegaeon.metrics import serve_metrics
from aegaeon.runtime import run_process
from aegaeon.telemetry import setup_tracing, shutdown_tracing


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--worker-id", default=f"{socket.gethostname()}-{os.getpid()}")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--role", default="both", choices=["prefill", "decode", "both"])
    parser.add_argument("--arena-bytes", type=int, default=None, help="device memory arena size")
    parser.add_argument("--weight-budget-bytes", type=int, default=None)
    parser.add_argument("--host-kv-bytes", type=int, default=None)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port")
    parser.add_argument(
        "--threads",
        type=int,
        default=max(1, (os.cpu_count() or 2) // 2),
        help="torch CPU threads (default: half the cores, leaving room for the other services)",
    )


async def serve(args: argparse.Namespace, stop: asyncio.Event) -> None:
    """Build the engine, connect, serve until ``stop``; then drain (finish the current turn)."""
    import torch
    from aegaeon.gpu_worker.engine import Engine, EngineConfig
    from aegaeon.gpu_worker.worker import WorkerService

    torch.set_num_threads(args.threads)

    options = {
        "device": args.device,
        "arena_bytes": args.arena_bytes,
        "weight_budget_bytes": args.weight_budget_bytes,
        "block_size": args.block_size,
    }
    if args.host_kv_bytes is not None:
        options["host_kv_bytes"] = args.host_kv_bytes
    setup_tracing("gpu-worker")
    serve_metrics(args.metrics_port)
    engine = Engine(EngineConfig(**options))
    config = BusConfig()
    bus = await Bus.connect(config, name=f"worker-{args.worker_id}")
    redis = aioredis.Redis.from_url(config.redis_url)
    worker = WorkerService(args.worker_id, args.role, engine, bus, redis)
    runner = asyncio.create_task(worker.run())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if not runner.done():
        await worker.drain()
        await runner
    stopper.cancel()
    await bus.close()
    await redis.aclose()
    engine.close()
    shutdown_tracing()


def main(args: argparse.Namespace) -> int:
    return run_process(f"worker[{args.worker_id}]", lambda stop: serve(args, stop))
