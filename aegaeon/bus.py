"""The NATS side of every service: connect, publish typed messages with trace context, subscribe.

Trace context (W3C ``traceparent``) travels in NATS headers, so one trace spans gateway,
scheduler and workers (DESIGN.md §4).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import nats
import redis.asyncio as aioredis
from nats.aio.client import Client
from nats.aio.msg import Msg
from opentelemetry import context as otel_context
from opentelemetry import propagate

from aegaeon.config import BusConfig
from aegaeon.protocol import decode, encode
from aegaeon.subjects import Subjects

log = logging.getLogger(__name__)

PERMISSIONS_VIOLATION = "permissions violation"
"""How NATS words a publish or subscription its user may not make (the connection stays up)."""


def trace_headers(context: otel_context.Context | None = None) -> dict[str, str] | None:
    """A trace context (default: the current one) as NATS headers (None when it has no span)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    return carrier or None


def context_from(msg: Msg) -> otel_context.Context:
    """The trace context a message carried, for starting a child span."""
    return propagate.extract(dict(msg.headers or {}))


class Reconnects:
    """The connection's reconnects, as an event per reconnect to come (set when it happens)."""

    def __init__(self) -> None:
        self._next = asyncio.Event()

    def next(self) -> asyncio.Event:
        return self._next

    async def notify(self) -> None:
        woken, self._next = self._next, asyncio.Event()
        woken.set()


RESEND_WINDOW_S = 5.0
"""How long before a disconnect an idempotent publish counts as possibly lost with its server:
a crashed server takes what it had accepted and not yet delivered (milliseconds' worth). What
is published while disconnected waits in the client's buffer and goes out on reconnecting."""


class Resends:
    """Idempotent publishes of the last :data:`RESEND_WINDOW_S`; those from just before a
    disconnect are sent again once the connection is back (core NATS is at-most-once)."""

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self._recent: deque[tuple[float, str, bytes, dict[str, str] | None]] = deque()
        self._at_disconnect: list[tuple[str, bytes, dict[str, str] | None]] = []

    def sent(self, subject: str, data: bytes, headers: dict[str, str] | None) -> None:
        now = time.monotonic()
        self._recent.append((now, subject, data, headers))
        while self._recent and self._recent[0][0] < now - RESEND_WINDOW_S:
            self._recent.popleft()

    def disconnected(self) -> None:
        since = time.monotonic() - RESEND_WINDOW_S
        self._at_disconnect = [entry[1:] for entry in self._recent if entry[0] >= since]
        self._recent.clear()

    async def resend(self) -> None:
        again, self._at_disconnect = self._at_disconnect, []
        if again:
            log.info("reconnected: sending %d idempotent messages again", len(again))
        for subject, data, headers in again:
            await self._nc.publish(subject, data, headers=headers)


class Bus:
    """One NATS connection with typed helpers. ``await Bus.connect(config, name)``."""

    def __init__(self, nc: Client, config: BusConfig) -> None:
        self.nc = nc
        self.config = config
        self.subjects = Subjects(config.prefix)
        self.reconnects = Reconnects()
        self.resends = Resends(nc)
        # Called after each reconnect: core NATS is at-most-once, so whatever was published
        # while this or another client was away may be lost and needs checking.
        self.reconnect_listeners: list[Callable[[], Awaitable[None]]] = [
            self.reconnects.notify,
            self.resends.resend,
        ]
        # Headers every message this bus sends carries (a scheduler term's fencing token).
        self.extra_headers: dict[str, str] = {}

    @classmethod
    async def connect(cls, config: BusConfig, name: str, **options: Any) -> Bus:
        """Connect, reconnecting forever: a NATS restart must not take a service down."""

        holder: list[Bus] = []

        async def on_disconnect() -> None:
            log.warning("%s: disconnected from NATS", name)
            if holder:
                holder[0].resends.disconnected()

        async def on_reconnect() -> None:
            log.warning("%s: reconnected to NATS", name)
            for listener in holder[0].reconnect_listeners if holder else []:
                try:
                    await listener()
                except Exception:
                    log.exception("reconnect listener failed")

        async def on_error(exc: Exception) -> None:
            if PERMISSIONS_VIOLATION in str(exc).lower():  # a subject missing from its role
                log.error("%s: NATS refused: %s (see aegaeon/bus_permissions.py)", name, exc)
            else:
                log.debug("%s: NATS error: %s", name, exc)

        nc = await nats.connect(
            config.nats_servers,
            name=name,
            user=config.nats_user,
            password=config.nats_password,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
            error_cb=on_error,
            **options,
        )
        bus = cls(nc, config)
        holder.append(bus)
        return bus

    def _headers(self, context: otel_context.Context | None = None) -> dict[str, str] | None:
        headers = {**(trace_headers(context) or {}), **self.extra_headers}
        return headers or None

    async def publish(
        self, subject: str, message: Any, context: otel_context.Context | None = None
    ) -> None:
        """Publish one typed message (fire and forget) with ``context`` (default: the current
        one) as its trace context: a service acting for one request among many names it."""
        await self.nc.publish(subject, encode(message), headers=self._headers(context))

    async def publish_idempotent(self, subject: str, message: Any) -> None:
        """:meth:`publish` for a message its receivers may get twice (a cancel): sent again
        after a reconnect when it was published shortly before the connection dropped, since
        the server that had it may have crashed before delivering it."""
        data, headers = encode(message), self._headers()
        await self.nc.publish(subject, data, headers=headers)
        self.resends.sent(subject, data, headers)

    async def request(self, subject: str, message: Any, reply_type: Any, timeout: float = 5.0):
        """Request/reply with a typed answer."""
        msg = await self.nc.request(
            subject, encode(message), timeout=timeout, headers=self._headers()
        )
        return decode(msg.data, reply_type)

    async def request_idempotent(
        self, subject: str, message: Any, reply_type: Any, timeout: float = 5.0
    ):
        """:meth:`request` for a request that may be answered twice: sent again whenever the
        connection is re-established while it waits. Core NATS is at-most-once, so an answer
        published while this client was away (its server crashed) is lost, and a plain request
        would wait out its whole ``timeout``; ``timeout`` bounds the whole wait here too."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            reconnected = asyncio.ensure_future(self.reconnects.next().wait())
            ask = asyncio.ensure_future(
                self.request(subject, message, reply_type, max(deadline - loop.time(), 0.001))
            )
            try:
                await asyncio.wait({ask, reconnected}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                reconnected.cancel()
                if not ask.done():
                    ask.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await ask
            if not ask.cancelled():
                return ask.result()
            log.info("reconnected while waiting on %s: asking again", subject)

    async def subscribe(
        self,
        subject: str,
        message_type: Any,
        handler: Callable[[Any, Msg], Awaitable[None]],
        queue: str = "",
    ):
        """Subscribe; each message is decoded to ``message_type`` and passed with its raw Msg.

        A message that does not decode is logged and dropped, never crashes the service.
        """

        async def on_message(msg: Msg) -> None:
            try:
                payload = decode(msg.data, message_type)
            except Exception as exc:  # malformed input from the wire
                log.error("dropping malformed message on %s: %s", msg.subject, exc)
                return
            try:
                await handler(payload, msg)
            except Exception:
                log.exception("handler for %s failed", msg.subject)

        return await self.nc.subscribe(subject, queue=queue, cb=on_message)

    async def reply(self, msg: Msg, message: Any) -> None:
        """Answer a request."""
        await msg.respond(encode(message))

    async def close(self) -> None:
        """Drain subscriptions, flush, close."""
        if not self.nc.is_closed:
            try:
                await self.nc.drain()
            except Exception:  # already closing / server gone
                await self.nc.close()


def connect_redis(config: BusConfig, max_connections: int | None = None) -> aioredis.Redis:
    """The Redis client of a service: ``config.redis_url`` with ``AEGAEON_REDIS_PASSWORD`` when
    the URL carries none (deployments keep it in a secret). ``max_connections``: a bounded,
    blocking pool, so a burst waits briefly for a connection instead of opening hundreds of
    sockets at once (a connect storm fails some)."""
    if max_connections is None:
        return aioredis.Redis.from_url(config.redis_url, password=config.redis_password)
    pool = aioredis.BlockingConnectionPool.from_url(
        config.redis_url, max_connections=max_connections, timeout=10,
        password=config.redis_password,
    )  # fmt: skip
    return aioredis.Redis(connection_pool=pool)
