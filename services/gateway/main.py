"""``aegaeon serve gateway``: one gateway process (uvicorn), with the shared process runtime."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import TYPE_CHECKING, Any

from aegaeon.config import BusConfig
from aegaeon.runtime import run_process
from aegaeon.subjects import subject_token
from aegaeon.telemetry import setup_tracing, shutdown_tracing

from .settings import GatewaySettings

if TYPE_CHECKING:
    import uvicorn

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port")
    parser.add_argument("--gateway-id", type=subject_token, default=None,
                        help="this gateway's id: letters, digits, '_' and '-' (default: random)")  # fmt: skip
    parser.add_argument("--insecure-open", action="store_true",
                        help="serve a non-loopback --host without API keys (anyone who reaches "
                             "it may use every model)")  # fmt: skip


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
    server = uvicorn.Server(server_config(create_app(settings), host, port))
    serving = asyncio.create_task(server.serve())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    server.should_exit = True
    stopping.cancel()
    await serving
    shutdown_tracing()


def server_config(app: Any, host: str, port: int, **options: Any) -> uvicorn.Config:
    """uvicorn's settings for the gateway app (``options`` for tests: a log level, a protocol).

    No ``limit_concurrency``: uvicorn would count idle keep-alive connections toward it and
    answer past it with a plain-text 503 without Retry-After, which OpenAI clients do not
    expect. The app bounds requests in progress itself (app.py's RequestLimit, outermost),
    answering an OpenAI error with Retry-After. A connection that sends no complete request
    head within 10 s of opening or of its last response is closed (``http_protocol``), so
    idle or trickling clients cannot hold sockets for ever; how many connections may be open
    at once is left to the OS's file limit (and a proxy, where one stands in front)."""
    import uvicorn

    from .http_protocol import HeadDeadlineProtocol

    settings: dict[str, Any] = {
        "access_log": False,
        "log_config": None,
        "http": HeadDeadlineProtocol,
    }
    return uvicorn.Config(app, host=host, port=port, **(settings | options))


def run_gateway_process(settings: GatewaySettings, host: str, port: int) -> int:
    """Run one gateway until SIGINT/SIGTERM. Returns the exit code."""
    log.info("gateway %s on http://%s:%d", settings.gateway_id, host, port)
    return run_process("gateway", lambda stop: serve_gateway(settings, host, port, stop))


def startup_refusal(settings: GatewaySettings, host: str, insecure_open: bool) -> str | None:
    """Why the gateway must not start as configured (a keys file that does not load, open
    access on a non-loopback address), or None."""
    from .auth import KeysFileError, KeyStore, exposure_refusal

    try:
        keystore = KeyStore.load(settings.api_keys_file)
    except KeysFileError as exc:
        return str(exc)
    return exposure_refusal(host, keystore, insecure_open)


def main(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    refusal = startup_refusal(settings, args.host, args.insecure_open)
    if refusal is not None:
        print(f"aegaeon serve gateway: {refusal}", file=sys.stderr)
        return 2
    return run_gateway_process(settings, args.host, args.port)
