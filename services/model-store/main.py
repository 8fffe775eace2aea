"""``aegaeon serve model-store``: the registry and the shared-memory host cache of one node."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil

import psutil

from aegaeon.bus import Bus
from aegaeon.config import BusConfig, default_store_id, shm_dir
from aegaeon.metrics import serve_metrics
from aegaeon.runtime import run_process
from aegaeon.telemetry import setup_tracing, shutdown_tracing
from aegaeon.transfer import check_reachable

from .host_cache import HostCache, cache_root
from .registry import NAME_PATTERN, RegistryScanner
from .service import ModelStoreService

log = logging.getLogger(__name__)

DEFAULT_CACHE_CAP = 8 * 1024**3


def default_cache_bytes() -> int:
    """8 GiB, or less: at most half of the free RAM and of the free shared memory."""
    free_ram = psutil.virtual_memory().available // 2
    free_shm = shutil.disk_usage(shm_dir()).free // 2 if shm_dir().is_dir() else free_ram
    return max(1, min(DEFAULT_CACHE_CAP, free_ram, free_shm))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models-dir", required=True, help="folder of models in HF layout")
    parser.add_argument(
        "--cache-bytes", type=int, default=None,
        help="host cache capacity (default: 8 GiB or half the free RAM, whichever is less)",
    )  # fmt: skip
    parser.add_argument(
        "--store-id", default=default_store_id(),
        help="names this store's shared-memory folder (aegaeon-<id>) and its node-local ensure "
        "subject; the workers of its node use the same id (default: the node name)",
    )  # fmt: skip
    parser.add_argument(
        "--weights-transfer-address", type=check_reachable,
        default=os.environ.get("AEGAEON_WEIGHTS_TRANSFER_ADDRESS", ""),
        help="host:port this store serves its cached weights from, to the stores of other nodes "
        "(port 0: any free one); the host is advertised, so give the address other nodes reach "
        "it at. Default $AEGAEON_WEIGHTS_TRANSFER_ADDRESS or none: other nodes read the models "
        "directory on their misses",
    )  # fmt: skip
    parser.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port")
    parser.add_argument(
        "--keep-alive-s", type=float, default=None,
        help="drop a model from the host cache when no worker asked for it this long "
        "(default: keep it until the cache needs the room)",
    )  # fmt: skip


async def serve(args: argparse.Namespace, stop: asyncio.Event) -> None:
    """Scan, connect, answer until ``stop``; then remove the cache from shared memory."""
    if not NAME_PATTERN.match(args.store_id):
        raise ValueError(f"--store-id {args.store_id!r}: letters, digits, '-' and '_' only")
    setup_tracing("model-store")
    serve_metrics(args.metrics_port)
    capacity = args.cache_bytes or default_cache_bytes()
    cache = HostCache(cache_root(args.store_id), capacity)
    bus = await Bus.connect(BusConfig(), name=f"model-store-{args.store_id}")
    service = ModelStoreService(bus, RegistryScanner(args.models_dir), cache, args.store_id,
                                transfer_address=args.weights_transfer_address)  # fmt: skip
    sweeper = asyncio.create_task(_evict_idle(cache, args.keep_alive_s)) if args.keep_alive_s else None  # fmt: skip
    try:
        await service.start()
        registry = await service.refresh()
        log.info(
            "model-store %s: %d models in %s, cache %d bytes at %s",
            args.store_id, len(registry.models), args.models_dir, capacity, cache.root,
        )  # fmt: skip
        for name, why in registry.problems.items():
            log.warning("skipping %s: %s", name, why)
        await stop.wait()
    finally:
        if sweeper is not None:
            sweeper.cancel()
        await service.stop()
        await bus.close()
        cache.close()
        shutdown_tracing()


async def _evict_idle(cache: HostCache, keep_alive_s: float) -> None:
    """Every quarter of the keep-alive (at most 30 s): drop the models idle that long."""
    while True:
        await asyncio.sleep(min(keep_alive_s / 4, 30.0))
        for name in await asyncio.to_thread(cache.evict_idle, keep_alive_s):
            log.info("%s idle for %.0f s: dropped from the host cache", name, keep_alive_s)


def run_model_store_process(args: argparse.Namespace) -> int:
    """Run the store in this process until SIGINT/SIGTERM; a crash exits non-zero."""
    return run_process(f"model-store[{args.store_id}]", lambda stop: serve(args, stop))


def main(args: argparse.Namespace) -> int:
    return run_model_store_process(args)
