"""What every service process does the same way: logging, signals, and a loud crash.

``run_process(name, serve)`` sets up logging, runs ``serve(stop_event)`` on a fresh event loop,
sets ``stop_event`` on SIGINT/SIGTERM, and exits non-zero with the traceback logged if it crashes,
so the supervisor (``aegaeon up``, compose, Kubernetes) sees it and restarts the service.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable


def setup_logging(service: str) -> None:
    """One log format for all services; level from AEGAEON_LOG_LEVEL (default INFO)."""
    logging.basicConfig(
        level=os.environ.get("AEGAEON_LOG_LEVEL", "INFO").upper(),
        format=f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def run_process(service: str, serve: Callable[[asyncio.Event], Awaitable[None]]) -> int:
    """Run one service until a signal asks it to stop. Returns the process exit code."""
    setup_logging(service)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(stop)

    try:
        asyncio.run(main())
    except Exception:
        logging.getLogger(service).exception("%s crashed", service)
        return 1
    return 0
