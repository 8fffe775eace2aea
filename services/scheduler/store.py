"""The scheduler's Redis side: the persisted queue of accepted requests, request metadata, and
the output tokens a recovery re-runs from (keys in :mod:`aegaeon.state`).

Every call retries through a short outage (Redis restarting) and then gives up with a warning
instead of raising: a scheduler loop must not crash on it. The queue writes that gave up (a
request queued, ended or dropped) are kept, the latest per request, and written by
:meth:`RequestStore.write_unwritten` once Redis answers again: otherwise a restart after a long
outage would lose requests accepted during it and re-run requests that ended during it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis

from aegaeon.protocol import SubmitRequest, decode, encode
from aegaeon.state import OUTPUT_AFTER_FINISH_S, REQUEST_TTL_S, Keys

log = logging.getLogger(__name__)

T = TypeVar("T")

RETRY_DELAYS_S = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6)
"""Back-off between attempts: about 3 s in all, longer than a local Redis restart."""

UNWRITTEN_RETRY_S = 1.0
"""How often the scheduler checks whether Redis is back to take the queue writes it missed."""

PERSIST_SCRIPT = """
-- KEYS: the queue hash, the request's metadata hash. ARGV: request id, packed submit, metadata
-- TTL, then field/value pairs. Atomic: an ended request is never queued again.
if redis.call('HEXISTS', KEYS[2], 'finish_reason') == 1 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], unpack(ARGV, 4))
redis.call('EXPIRE', KEYS[2], ARGV[3])
return 1
"""
"""Queue an accepted request and write its metadata, unless it has ended (one round trip)."""


class RequestStore:
    """Redis reads and writes of the scheduler, each one retried (see module docstring)."""

    def __init__(self, redis: aioredis.Redis, prefix: str) -> None:
        self.redis = redis
        self.keys = Keys(prefix)
        self._persist = redis.register_script(PERSIST_SCRIPT)
        # request id → its latest queue write that Redis missed (one attempt; True: written)
        self._unwritten: dict[str, Callable[[], Awaitable[bool]]] = {}

    async def _retry(
        self,
        what: str,
        op: Callable[[], Awaitable[T]],
        default: T,
        delays: tuple[float, ...] = RETRY_DELAYS_S,
    ) -> T:
        for delay in (*delays, None):
            try:
                return await op()
            except (aioredis.ConnectionError, aioredis.TimeoutError, OSError) as exc:
                if delay is None:
                    log.warning("redis: %s failed, giving up: %s", what, exc)
                    return default
                await asyncio.sleep(delay)
        return default

    async def _pipeline(
        self, what: str, build: Callable[[Any], None], delays: tuple[float, ...] = RETRY_DELAYS_S
    ) -> bool:
        """Run one transaction; whether it was written."""

        async def run() -> bool:
            async with self.redis.pipeline(transaction=True) as pipe:
                build(pipe)
                await pipe.execute()
            return True

        return await self._retry(what, run, False, delays)

    def _written(self, request_id: str, done: bool, again: Callable[[], Awaitable[bool]]) -> None:
        """Book a queue write's outcome: if Redis missed it, ``again`` is the request's write to
        make when it is back (replacing an older one: the latest write says it all)."""
        if done:
            self._unwritten.pop(request_id, None)
        else:
            self._unwritten[request_id] = again

    async def write_unwritten(self) -> None:
        """Make the queue writes Redis missed, oldest request first; quiet while it is away."""
        if not self._unwritten:
            return
        try:
            await self.redis.ping()
        except (aioredis.ConnectionError, aioredis.TimeoutError, OSError):
            return
        for request_id, write in list(self._unwritten.items()):
            done = await write()
            if self._unwritten.get(request_id) is write:  # not replaced meanwhile
                self._written(request_id, done, write)
            if not done:
                return
        log.info("redis is back: the queue writes it missed are made")

    # ------------------------------------------------------------------ the queue

    async def persist(self, submit: SubmitRequest) -> bool:
        """Remember an accepted request until it ends (a restarted scheduler resumes it). False,
        writing nothing, when the request has ended already (its metadata holds a finish reason):
        its submit came again after the scheduler that ran it went away. True when Redis cannot
        be reached (the request is then admitted, as before the outage)."""
        fields: dict[str, str | int | float] = {
            "state": "queued",
            "model": submit.model,
            "gateway": submit.gateway_id,
            "prompt_len": len(submit.prompt_token_ids),
            "arrival": submit.arrival_time,
        }
        keys = [self.keys.queue, self.keys.request(submit.request_id)]
        args: list[str | bytes | int | float] = [submit.request_id, encode(submit), REQUEST_TTL_S]
        args += [part for field in fields.items() for part in field]
        what = f"persist {submit.request_id}"

        async def write(delays: tuple[float, ...] = RETRY_DELAYS_S) -> int | None:
            return await self._retry(what, lambda: self._persist(keys=keys, args=args), None, delays)  # fmt: skip

        async def again() -> bool:
            return await write(()) is not None

        written = await write()
        self._written(submit.request_id, written is not None, again)
        return written != 0

    async def has_ended(self, request_id: str) -> bool:
        """Whether the request's metadata holds a finish reason. Asked once, not retried: False
        when Redis cannot say (the caller goes on as for a request it has not seen)."""
        key = self.keys.request(request_id)
        found = await self._retry(
            f"read the end of {request_id}",
            lambda: self.redis.hexists(key, "finish_reason"),
            False,
            delays=(),
        )
        return bool(found)

    async def queued(self) -> list[tuple[SubmitRequest, str | None, int]]:
        """Every persisted request, with the worker that last held it and its output length."""
        raw: dict[Any, Any] = await self._retry(
            "read queue", lambda: self.redis.hgetall(self.keys.queue), {}
        )
        found = []
        for request_id, packed in raw.items():
            try:
                submit = decode(packed, SubmitRequest)
            except Exception as exc:  # written by an older, incompatible version
                log.error("dropping unreadable queued request %r: %s", request_id, exc)
                await self.forget_queued(_text(request_id))
                continue
            worker, produced = await self._holder_and_length(submit.request_id)
            found.append((submit, worker, produced))
        return found

    async def _holder_and_length(self, request_id: str) -> tuple[str | None, int]:
        async def read() -> tuple[Any, Any]:
            worker = await self.redis.hget(self.keys.request(request_id), "worker")
            produced = await self.redis.llen(self.keys.output_tokens(request_id))
            return worker, produced

        worker, produced = await self._retry(f"read {request_id}", read, (None, 0))
        return (_text(worker) if worker else None), int(produced or 0)

    async def forget_queued(self, request_id: str) -> None:
        def build(pipe: Any) -> None:
            pipe.hdel(self.keys.queue, request_id)

        done = await self._pipeline(f"forget {request_id}", build)
        self._written(request_id, done, lambda: self._pipeline(f"forget {request_id}", build, ()))

    # ------------------------------------------------------------------ one request

    async def output_tokens(self, request_id: str) -> list[int] | None:
        """The tokens already sent to the client (None when Redis cannot say)."""
        raw = await self._retry(
            f"read outputs of {request_id}",
            lambda: self.redis.lrange(self.keys.output_tokens(request_id), 0, -1),
            None,
        )
        return None if raw is None else [int(t) for t in raw]

    async def mark_running(self, request_id: str, worker_id: str) -> None:
        key = self.keys.request(request_id)

        def build(pipe: Any) -> None:
            pipe.hset(key, mapping={"state": "running", "worker": worker_id})
            pipe.expire(key, REQUEST_TTL_S)

        await self._pipeline(f"mark {request_id} running", build)

    async def finish(self, request_id: str, reason: str, output_len: int) -> None:
        """The request ended: out of the queue, metadata final and expiring, recovery data gone."""
        key = self.keys.request(request_id)
        state = {"stop": "finished", "length": "finished", "abort": "cancelled"}.get(
            reason, "error"
        )
        fields = {
            "state": state,
            "finish_reason": reason,
            "finished_at": time.time(),
            "output_len": output_len,
        }

        def build(pipe: Any) -> None:
            pipe.hdel(self.keys.queue, request_id)
            pipe.hset(key, mapping=fields)
            pipe.expire(key, REQUEST_TTL_S)
            # Kept a little while: a gateway that lost the last events in a bus restart
            # completes the stream from it.
            pipe.expire(self.keys.output_tokens(request_id), OUTPUT_AFTER_FINISH_S)

        done = await self._pipeline(f"finish {request_id}", build)
        self._written(request_id, done, lambda: self._pipeline(f"finish {request_id}", build, ()))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
