"""``aegaeon serve worker``: one gpu-worker process (one per accelerator; the CPU counts as one)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import time

from aegaeon.gpu_worker.sizing import (
    CPU_RAM_SHARE,
    CUDA_FREE_SHARE,
    ENGINE_DTYPES,
    engine_dtype,
    plan_memory,
)

from aegaeon.bus import Bus, connect_redis
from aegaeon.config import BusConfig, default_store_id
from aegaeon.metrics import serve_metrics
from aegaeon.protocol import ListModels, ModelInfo, ModelList
from aegaeon.runtime import run_process
from aegaeon.subjects import host_token, subject_token
from aegaeon.telemetry import setup_tracing, shutdown_tracing
from aegaeon.transfer import check_reachable

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--worker-id", type=subject_token,
                        default=f"{host_token(socket.gethostname())}-{os.getpid()}",
                        help="this worker's id: letters, digits, '_' and '-' (default host-pid)")  # fmt: skip
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--role", default="both", choices=["prefill", "decode", "both"])
    parser.add_argument("--store-id", type=subject_token, default=default_store_id(),
                        help="the model-store of this node (its --store-id; default: the node "
                        "name): asked for the host cache, whose files this worker maps")  # fmt: skip
    parser.add_argument("--dtype", default="auto", choices=["auto", *ENGINE_DTYPES],
                        help="what the worker computes in (default auto: the registered models' "
                        "own dtype when they share one — float32 ones run in bfloat16 on CUDA — "
                        "else float32 on the CPU, bfloat16 on CUDA; other models are converted "
                        "at their switch)")  # fmt: skip
    parser.add_argument("--arena-bytes", type=int, default=None, help="device memory arena size")
    parser.add_argument("--weight-budget-bytes", type=int, default=None)
    parser.add_argument("--host-kv-bytes", type=int, default=None)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                        help="CUDA: launch each decode kernel from Python instead of replaying "
                        "captured graphs (slower; for diagnosis)")  # fmt: skip
    parser.add_argument("--kv-transfer-address", type=check_reachable,
                        default=os.environ.get("AEGAEON_KV_TRANSFER_ADDRESS", ""),
                        help="host:port this worker serves exported KV from, to decode workers "
                        "on other nodes (port 0: any free one); the host is advertised, so give "
                        "the address other nodes reach it at. Default $AEGAEON_KV_TRANSFER_ADDRESS "
                        "or none: a request handed to another node is re-prefilled there")  # fmt: skip
    parser.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port")
    parser.add_argument(
        "--threads",
        type=int,
        default=max(1, (os.cpu_count() or 2) // 2),
        help="torch CPU threads (default: half the cores, leaving room for the other services)",
    )


MODELS_WAIT_S = 10.0  # at start, how long to wait for the model-store's list


async def registered_models(bus: Bus, wait_s: float = MODELS_WAIT_S) -> list[ModelInfo]:
    """The registry, to size the weight slots (empty if no model-store answers in time)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            reply = await bus.request(bus.subjects.models("list"), ListModels(), ModelList, 2.0)
            return list(reply.models)
        except Exception as exc:
            if time.monotonic() >= deadline:
                log.warning("no model list from the model-store (%s): default slot sizes", exc)
                return []
            await asyncio.sleep(0.2)


def device_bytes(device: str) -> int:
    """What the device may give the arena: most of free CUDA memory, or a share of RAM."""
    import psutil
    import torch

    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free * CUDA_FREE_SHARE)
    return int(psutil.virtual_memory().total * CPU_RAM_SHARE)


async def serve(args: argparse.Namespace, stop: asyncio.Event) -> None:
    """Build the engine, connect, serve until ``stop``; then drain (finish the current turn)."""
    import torch
    from aegaeon.gpu_worker.engine import Engine, EngineConfig
    from aegaeon.gpu_worker.worker import WorkerService

    torch.set_num_threads(args.threads)
    setup_tracing("gpu-worker")
    serve_metrics(args.metrics_port)
    config = BusConfig()
    bus = await Bus.connect(config, name=f"worker-{args.worker_id}")
    models = await registered_models(bus)
    dtype = engine_dtype(models, args.dtype, cuda=args.device.startswith("cuda"))
    converted = sorted(m.name for m in models if m.dtype != dtype)
    log.info("computing in %s%s", dtype, f" (converted at their switch: {', '.join(converted)})" if converted else "")  # fmt: skip
    engine_config = EngineConfig(device=args.device, dtype=dtype, block_size=args.block_size,
                                 cuda_graphs=args.cuda_graphs)  # fmt: skip
    if args.host_kv_bytes is not None:
        engine_config.host_kv_bytes = args.host_kv_bytes
    plan = plan_memory(
        models,
        engine_dtype=dtype,
        slots=engine_config.weight_slots,
        device_bytes=device_bytes(args.device),
        arena_bytes=args.arena_bytes,
        weight_budget_bytes=args.weight_budget_bytes,
    )
    for reason in plan.refused.values():
        log.error("%s", reason)  # its requests are refused with this size check at the scheduler
    engine_config.arena_bytes = plan.arena_bytes
    engine_config.weight_budget_bytes = plan.weight_budget_bytes
    engine = Engine(engine_config)
    redis = connect_redis(config)
    worker = WorkerService(args.worker_id, args.role, engine, bus, redis, store_id=args.store_id,
                           kv_transfer_address=args.kv_transfer_address)  # fmt: skip
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
