"""What a request waiting for its first token hears while its model's weights load: a status
event to its gateway at once and then every ``LOADING_REPORT_S`` until the switch ends, with the
bytes of the model already in a slot. The gateway shows each as an SSE comment line."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aegaeon.protocol import RequestStatus, TokenBatch, status_batches

LOADING_REPORT_S = 0.5

Publish = Callable[[str, TokenBatch], Awaitable[None]]  # (gateway id, batch)


async def report_loading(
    publish: Publish,
    waiting: dict[str, str],
    model: str,
    loaded: Callable[[], tuple[int, int]],
) -> None:
    """Until cancelled: tell the gateway of each waiting request (request id → gateway id) how
    much of ``model`` is loaded (``loaded()`` → (bytes in a slot, weight bytes))."""
    while True:
        done, total = loaded()
        status = RequestStatus("loading", model=model, bytes_done=done, bytes_total=total or None)
        batches = status_batches((r, gateway, status) for r, gateway in waiting.items())
        for gateway_id, batch in batches.items():
            await publish(gateway_id, batch)
        await asyncio.sleep(LOADING_REPORT_S)
