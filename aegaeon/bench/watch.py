"""A benchmark's second pair of eyes on the stack: subscribe to its NATS subjects beside the
services (core NATS delivers every message to every subscriber) and keep what it needs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

from aegaeon.protocol import decode


class Watcher:
    """``async with Watcher(url, subject, MessageType, keep):`` calls ``keep(message)`` for every
    message on ``subject`` (wildcards allowed) until the block ends. Messages that do not decode
    are skipped (a benchmark watches, it does not police the wire)."""

    def __init__(
        self, nats_url: str, subject: str, message_type: Any, keep: Callable[[Any], None]
    ) -> None:
        self.nats_url = nats_url
        self.subject = subject
        self.message_type = message_type
        self.keep = keep
        self.skipped = 0
        self.nc: Client | None = None

    async def __aenter__(self) -> Watcher:
        self.nc = await nats.connect(self.nats_url)

        async def on_message(msg: Msg) -> None:
            try:
                message = decode(msg.data, self.message_type)
            except Exception:  # another version's message, or noise on a wildcard
                self.skipped += 1
                return
            self.keep(message)

        await self.nc.subscribe(self.subject, cb=on_message)
        await self.nc.flush()  # the subscription is on the server before the caller goes on
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.nc is not None:
            await self.nc.drain()  # handles what already arrived, then closes
