"""Leader election: every scheduler process starts as a standby; the one that holds the lease in
Redis runs the scheduling service, the others wait to take it over.

::

            SET key holder NX PX ttl                     renew every renew_s:
    standby ───────────────────────────► leader ────────  GET key == holder: PEXPIRE key ttl
       ▲      (every renew_s until it                │     no key (Redis lost it): SET it again
       │       is free: the leader died or left)     │ the key is another's, no confirmed renew
       │                                             │ by the deadline, SIGTERM, or a crash
       └──── service stopped, lease released ◄───────┘ (then the process exits non-zero)

A term (one stretch of leading) runs a fresh service: it subscribes, resumes the queue from
Redis and schedules, exactly as a restarted scheduler does. Its bus and store are fenced
(``fencing.py``): they refuse to act once the term's deadline (``lease.py``) has passed, even
before this loop gets to stop the service; and every message its bus sends carries the term's
epoch, larger than any earlier term's, so that a worker that has heard a newer term drops what
an older one still sends (``aegaeon.fencing_token``). Releasing is compare-and-delete, renewing
compare-and-extend (Lua, atomic in Redis): a process never extends or deletes a lease that
is not its own. A renew that finds no key at all (a Redis restarted without its data) sets it
again: within the renewer's deadline no standby may take it (``lease.Sighting``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio as aioredis
from aegaeon.scheduler.lease import Holder, LeaseClock, Sighting
from redis.exceptions import RedisError

from aegaeon import metrics

log = logging.getLogger(__name__)

RENEW_SCRIPT = """
local value = redis.call('GET', KEYS[1])
if value == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not value then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 2
end
return 0
"""
"""Compare-and-extend: the lease's expiry moves only while it names the caller; a key that is
gone (Redis restarted without it) is set again, one that names another is left alone."""

Renewal = Literal["lost", "extended", "recreated"]

TAKE_SCRIPT = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 0
end
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
local epoch = math.max(last + 1, now_us)
redis.call('SET', KEYS[2], string.format('%d', epoch))
return epoch
"""
"""Take the lease when free and give the term its *epoch*, the fencing token workers check
(``aegaeon.fencing_token``): larger than every earlier term's, by the epoch key while Redis keeps
it and by Redis's clock (microseconds) when it lost it. 0: the lease was not free."""

RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
"""Compare-and-delete: a process removes only its own lease."""

STOP_GRACE_S = 10.0
"""How long a lost term's service may take to stop (unsubscribe, end its loops); past it the
service is cancelled, and a service that does not end even then takes the process down."""

REDIS_FAILURES = (RedisError, OSError, TimeoutError)


class RedisLease:
    """The lease key in Redis: take it when free, extend or delete it only while it is ours."""

    def __init__(self, redis: aioredis.Redis, key: str, ttl_ms: int) -> None:
        self.redis, self.key, self.ttl_ms = redis, key, ttl_ms
        self.epoch_key = f"{key}:epoch"
        self._take = redis.register_script(TAKE_SCRIPT)
        self._renew = redis.register_script(RENEW_SCRIPT)
        self._release = redis.register_script(RELEASE_SCRIPT)

    async def take(self, holder: Holder) -> int:
        """The new term's epoch when the key was free and now names ``holder`` for ttl, else 0."""
        keys = [self.key, self.epoch_key]
        return int(await self._take(keys=keys, args=[str(holder), self.ttl_ms]))

    async def renew(self, holder: Holder) -> Renewal:
        """``extended``: the key still named ``holder``, its ttl starts over; ``recreated``: it was
        gone and names ``holder`` again; ``lost``: it names another holder."""
        code = int(await self._renew(keys=[self.key], args=[str(holder), self.ttl_ms]))
        return ("lost", "extended", "recreated")[code]  # type: ignore[return-value]

    async def release(self, holder: Holder) -> bool:
        """True when the key named ``holder`` and is now gone."""
        return bool(await self._release(keys=[self.key], args=[str(holder)]))

    async def holder(self) -> Holder | None:
        """Who holds the lease now (None: nobody)."""
        return Holder.parse(await self.redis.get(self.key))

    async def look(self) -> tuple[str | None, float, str]:
        """In one round trip: the key's value (None: free), the seconds it has left, and the
        Redis server's run id (new at every server start)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(self.key)
            pipe.pttl(self.key)
            pipe.info("server")
            value, pttl_ms, info = await pipe.execute()
        text = value.decode(errors="replace") if isinstance(value, bytes) else value
        ttl_left_s = float("inf") if pttl_ms == -1 else max(0, pttl_ms) / 1000  # -1: no expiry
        return text, ttl_left_s, str(info.get("run_id", ""))


@dataclass
class Term:
    """One stretch of leading. ``leads()`` is the fence its bus and store check at every call:
    False for good once the term ended, and False as soon as its deadline passed."""

    holder: Holder
    clock: LeaseClock
    now: Callable[[], float]
    taken_at: float
    epoch: int = 0  # the fencing token its commands carry (TAKE_SCRIPT)
    ended: bool = False

    def leads(self) -> bool:
        return not self.ended and self.clock.leads(self.now())


RunTerm = Callable[[Term, asyncio.Event], Coroutine[Any, Any, None]]
"""Runs the scheduling service for one term until the event is set."""


class Leadership:
    """Stand by, lead while holding the lease, stand by again. ``await run(stop)``."""

    def __init__(
        self,
        lease: RedisLease,
        scheduler_id: str,
        clock: LeaseClock,
        run_term: RunTerm,
        now: Callable[[], float] = time.monotonic,
        stop_grace_s: float = STOP_GRACE_S,
    ) -> None:
        self.lease, self.scheduler_id, self.clock = lease, scheduler_id, clock
        self.run_term, self.now, self.stop_grace_s = run_term, now, stop_grace_s
        self._seen: str | None = None  # what the standby last logged about the lease
        self._sighting = Sighting()

    async def run(self, stop: asyncio.Event) -> None:
        """Until ``stop``: take the lease when free, lead while it holds, release it at the end.
        Raises when a term's service crashed (after releasing the lease)."""
        metrics.SCHEDULER_IS_LEADER.set(0)
        log.info("scheduler %s standing by: lease %s, ttl %.1f s, renewed every %.1f s",
                 self.scheduler_id, self.lease.key, self.clock.ttl_s, self.clock.renew_s)  # fmt: skip
        standby_since = self.now()
        while not stop.is_set():
            term = await self._take()
            if term is None:
                await _wait(stop, self.clock.renew_s)
                continue
            log.info("took the leader lease as %s after %.2f s standing by (previously: %s)",
                     term.holder, term.taken_at - standby_since, self._seen or "nobody")  # fmt: skip
            self._seen = None
            await self._lead(term, stop)
            standby_since = self.now()

    # ------------------------------------------------------------------ standby

    async def _take(self) -> Term | None:
        """One look at the lease, and an attempt to take it when it is free: a term if it was."""
        try:
            value, ttl_left_s, run_id = await asyncio.wait_for(
                self.lease.look(), self.clock.renew_s
            )
            now = self.now()
            if value is not None:
                self._sighting.saw(run_id, ttl_left_s, now)
                self._standby_note(f"held by {value}")
                return None
            if not self._sighting.may_take(run_id, now):
                self._standby_note("gone after a Redis restart: waiting until the lease last "
                                   "seen runs out (its holder may still lead and set it again)")  # fmt: skip
                return None
            holder = Holder.new(self.scheduler_id)
            sent = self.now()
            took = await asyncio.wait_for(self.lease.take(holder), self.clock.renew_s)
        except REDIS_FAILURES as exc:
            self._standby_note(f"unknown: Redis unreachable ({exc or type(exc).__name__})")
            return None
        if not took:
            return None
        self.clock.confirmed(sent)
        self._sighting = Sighting()
        return Term(holder, self.clock, self.now, taken_at=self.now(), epoch=took)

    def _standby_note(self, what: str) -> None:
        """Log what the standby sees when it changes (not once a second)."""
        if what != self._seen:
            self._seen = what
            log.info("standing by: lease %s", what)

    # ------------------------------------------------------------------ leading

    async def _lead(self, term: Term, stop: asyncio.Event) -> None:
        metrics.SCHEDULER_IS_LEADER.set(1)
        term_stop = asyncio.Event()
        task = asyncio.create_task(self.run_term(term, term_stop))
        why = "cancelled"
        try:
            why = await self._keep(term, stop, task)
        finally:
            term.ended = True  # the fence closes first: nothing of this term acts from here on
            self.clock.lose()
            metrics.SCHEDULER_IS_LEADER.set(0)
            term_stop.set()
            await self._wind_down(task)
            await self._release(term)
        crash = None if task.cancelled() else task.exception()
        if crash is not None:
            raise RuntimeError(f"the scheduling service crashed: {crash!r}") from crash
        if stop.is_set():
            log.info("stopping: released the leader lease %s", term.holder)
        elif why == "its service ended":
            raise RuntimeError("the scheduling service ended while leading")
        else:
            log.warning("lost the leader lease %s: %s; standing by", term.holder, why)

    async def _keep(self, term: Term, stop: asyncio.Event, task: asyncio.Task) -> str:
        """Renew the lease on time until the term must end; returns why it ends."""
        stopping = asyncio.create_task(stop.wait())
        try:
            while True:
                wake = self.clock.wake_at()
                assert wake is not None, "a leading clock has a deadline"
                await asyncio.wait({stopping, task}, timeout=max(0.0, wake - self.now()),
                                   return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
                if stop.is_set():
                    return "stopping"
                if task.done():
                    return "its service ended"
                if not self.clock.leads(self.now()):
                    return "no renew confirmed before the deadline"
                renew_at = self.clock.renew_at
                if renew_at is not None and self.now() >= renew_at and not await self._renew(term):
                    return "the lease expired and another scheduler holds it"
        finally:
            stopping.cancel()

    async def _renew(self, term: Term) -> bool:
        """One renew attempt; False only when the lease is no longer ours."""
        sent = self.now()
        deadline = self.clock.deadline
        assert deadline is not None
        try:
            renewal = await asyncio.wait_for(
                self.lease.renew(term.holder), max(0.01, deadline - sent)
            )
        except REDIS_FAILURES as exc:
            log.warning("renewing the leader lease failed (%s); %.2f s to its deadline",
                        exc or type(exc).__name__, deadline - self.now())  # fmt: skip
            self.clock.failed(self.now())
            return True
        if renewal == "lost":
            return False
        if renewal == "recreated":
            log.warning("the leader lease was gone from Redis (a restart without its data?): "
                        "set it again as %s", term.holder)  # fmt: skip
        self.clock.confirmed(sent)
        return True

    async def _wind_down(self, task: asyncio.Task) -> None:
        """Wait for the term's service to stop; cancel it past the grace; give up loudly."""
        done, _ = await asyncio.wait({task}, timeout=self.stop_grace_s)
        if not done:
            log.error("the service did not stop within %.0f s: cancelling it", self.stop_grace_s)
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=1.0)
            if not done:
                raise RuntimeError("the scheduling service of an ended term does not stop")

    async def _release(self, term: Term) -> None:
        """Delete the lease if it is still ours, so a standby need not wait for it to expire."""
        try:
            await asyncio.wait_for(self.lease.release(term.holder), self.clock.renew_s)
        except REDIS_FAILURES as exc:
            log.warning("could not release the leader lease (it expires by itself): %s", exc)


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds`` or until ``stop`` is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
