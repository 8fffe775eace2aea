"""``aegaeon serve gateway``: one gateway process (uvicorn), with the shared process runtime."""

from __future__ import annotations

import argparse
import asyncio
import logging

from aegaeon.config import BusConfig
from aegaeon.runtime import run_process
from aegaeon.telemetry import setup_tracing, shutdown_tracing

from .settings import GatewaySettings

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port")
    parser.add_argument("--gateway-id", default=None, help="this gateway's id (default: random)")


def settings_from(args: argparse.Namespace) -> GatewaySettings:
    if args.gateway_id:
        return GatewaySettings(bus=BusConfig(), gateway_id=args.gateway_id)
    return GatewaySettings(bus=BusConfig())


async def serve_gateway(settings: GatewaySettings, host: str, port: int, stop: asyncio.Event):
    """Serve until ``stop`` is set; uvicorn then drains connections and the app's lifespan
    closes NATS and Redis."""
    import uvicorn

    from .app import create_app

    setup_tracing("gateway")
    config = uvicorn.Config(
        create_app(settings), host=host, port=port, access_log=False, log_config=None
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    server.should_exit = True
    stopping.cancel()
    await serving
    shutdown_tracing()


def run_gateway_process(settings: GatewaySettings, host: str, port: int) -> int:
    """Run one gateway until SIGINT/SIGTERM. Returns the exit code."""
    log.info("gateway %s on http://%s:%d", settings.gateway_id, host, port)
    return run_process("gateway", lambda stop: serve_gateway(settings, host, port, stop))


def main(args: argparse.Namespace) -> int:
    return run_gateway_process(settings_from(args), args.host, args.port)
