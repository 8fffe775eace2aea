"""The bus and the Redis store of one leadership term, fenced: every message out and every Redis
call first checks that the term still leads, and raises :class:`NotLeader` when it does not.

The leadership shell stops a term's service when its deadline passes, but a process that was
paused (SIGSTOP, a long GC, a frozen VM) may run queued callbacks before that check gets its turn:
these wrappers make such a late handler fail at its first I/O instead of commanding workers or
rewriting the queue after a standby may have taken over. And should one slip through (a pause
between the check and the send), its messages carry the term's epoch: a worker that has heard
the successor drops them (``aegaeon.fencing_token``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from aegaeon.scheduler.store import RETRY_DELAYS_S, RequestStore
from nats.aio.msg import Msg
from opentelemetry import context as otel_context

from aegaeon.bus import Bus
from aegaeon.fencing_token import epoch_headers

T = TypeVar("T")

Leads = Callable[[], bool]
"""True while the term may act as leader (checked at every call)."""


class NotLeader(RuntimeError):
    """The term that made this call no longer leads; nothing was sent or written."""


class FencedBus(Bus):
    """A :class:`Bus` on the process' NATS connection whose publish, request and reply act only
    while ``leads()``. Subscriptions are the connection's own; the service removes them when its
    term stops."""

    def __init__(self, bus: Bus, leads: Leads, epoch: int = 0) -> None:
        super().__init__(bus.nc, bus.config)
        self.reconnect_listeners, self.reconnects = bus.reconnect_listeners, bus.reconnects
        self.resends = bus.resends
        self._leads = leads
        self.extra_headers = epoch_headers(epoch)  # workers drop an older term's commands

    def _check(self) -> None:
        if not self._leads():
            raise NotLeader("this scheduler no longer holds the leader lease")

    async def publish(
        self, subject: str, message: Any, context: otel_context.Context | None = None
    ) -> None:
        self._check()
        await super().publish(subject, message, context)

    async def publish_idempotent(self, subject: str, message: Any) -> None:
        self._check()
        await super().publish_idempotent(subject, message)

    async def request(self, subject: str, message: Any, reply_type: Any, timeout: float = 5.0):
        self._check()
        return await super().request(subject, message, reply_type, timeout)

    async def reply(self, msg: Msg, message: Any) -> None:
        self._check()
        await super().reply(msg, message)

    async def close(self) -> None:
        """Nothing: the connection is the process', closed by whoever opened it."""


class FencedStore(RequestStore):
    """A :class:`RequestStore` whose every Redis call (each attempt of its retries, which are
    the one path all of them take) runs only while ``leads()``."""

    def __init__(self, redis: aioredis.Redis, prefix: str, leads: Leads) -> None:
        super().__init__(redis, prefix)
        self._leads = leads

    async def _retry(
        self,
        what: str,
        op: Callable[[], Awaitable[T]],
        default: T,
        delays: tuple[float, ...] = RETRY_DELAYS_S,
    ) -> T:
        async def fenced() -> T:
            if not self._leads():
                raise NotLeader(f"this scheduler no longer holds the leader lease ({what})")
            return await op()

        return await super()._retry(what, fenced, default, delays)
