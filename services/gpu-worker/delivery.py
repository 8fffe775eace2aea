"""Where a worker's tokens go: each step's tokens to the gateways that own the requests (one
batch per gateway), the same tokens to Redis for recovery (written behind the next engine step,
in order, one write at a time), and a RequestDone to the scheduler for each request that finished.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from aegaeon.bus import Bus
from aegaeon.protocol import RequestDone, TokenBatch, TokenEvent
from aegaeon.state import REQUEST_TTL_S, Keys
from aegaeon.telemetry import RequestTrace

log = logging.getLogger(__name__)

CLIENT_ERROR = "the server failed while generating this request; it was stopped"
"""What a client is told when the engine fails its request: the cause (exception text, which can
name internals) goes to the worker's log and to the scheduler's RequestDone, not to the client."""


@dataclass
class HeldRequest:
    """What the shell remembers of a request the engine holds: where its tokens go."""

    request_id: str
    model: str
    gateway_id: str
    produced: int  # tokens of the output so far (incl. any sent before a recovery)
    trace: RequestTrace | None = None  # its gateway's trace: the request's spans go there
    prefilled: bool = False  # its KV exists here (on the device or in the host pool)
    swapped: bool = False  # its KV is in the host pool: the next step brings it back


class TokenDelivery:
    """Sends the tokens of the requests in ``held`` (the worker's own dict: a finished request
    leaves it here)."""

    def __init__(self, worker_id: str, bus: Bus, redis: aioredis.Redis,
                 held: dict[str, HeldRequest]) -> None:  # fmt: skip
        self.worker_id = worker_id
        self.bus = bus
        self.redis = redis
        self.keys = Keys(bus.config.prefix)
        self.held = held
        self._redis_writes: asyncio.Task | None = None  # the write under way
        self._unrecorded: dict[str, list[int]] = {}  # tokens sent, not yet handed to a write

    async def deliver(self, outputs: Sequence[Any]) -> list[str]:
        """Publish one step's tokens to each owning gateway; returns the finished request ids."""
        per_gateway: dict[str, list[TokenEvent]] = defaultdict(list)
        finished: list[str] = []
        redis_tokens: dict[str, list[int]] = defaultdict(list)
        failed: dict[str, str] = {}
        for out in outputs:
            held = self.held.get(out.request_id)
            if held is None:
                continue
            if out.error is not None:  # this request alone failed in the engine: end it
                failed[out.request_id] = out.error
                per_gateway[held.gateway_id].append(
                    TokenEvent(out.request_id, out.index, [], finish_reason="error",
                               error=CLIENT_ERROR)
                )  # fmt: skip
                finished.append(out.request_id)
                continue
            per_gateway[held.gateway_id].append(
                TokenEvent(out.request_id, out.index, [int(out.token_id)], _logprobs(out),
                           finish_reason=out.finish_reason)
            )  # fmt: skip
            held.produced = out.index + 1
            redis_tokens[out.request_id].append(int(out.token_id))
            if out.finish_reason is not None:
                finished.append(out.request_id)
        for gateway_id, events in per_gateway.items():
            batch = TokenBatch(events, sent_at=time.time())
            await self.bus.publish(self.bus.subjects.tokens(gateway_id), batch)
        self.record(redis_tokens)
        for rid in finished:
            held = self.held.pop(rid)
            await self.bus.publish(
                self.bus.subjects.worker_events(self.worker_id),
                RequestDone(self.worker_id, rid, _reason(outputs, rid), held.produced,
                            failed.get(rid, "")),
            )  # fmt: skip
        return finished

    def record(self, tokens: dict[str, list[int]]) -> None:
        """Record sent tokens in Redis for recovery, behind the next engine step and in order:
        one write at a time, each taking every token recorded while the one before was under
        way (under load one Redis round trip then carries many steps' tokens, not one each)."""
        for request_id, ids in tokens.items():
            self._unrecorded.setdefault(request_id, []).extend(ids)
        if self._unrecorded and (self._redis_writes is None or self._redis_writes.done()):
            self._redis_writes = asyncio.create_task(self._write_unrecorded())

    async def _write_unrecorded(self) -> None:
        while self._unrecorded:
            tokens, self._unrecorded = self._unrecorded, {}
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for request_id, ids in tokens.items():
                        key = self.keys.output_tokens(request_id)
                        pipe.rpush(key, *ids)
                        pipe.expire(key, REQUEST_TTL_S)
                    await pipe.execute()
            except Exception as exc:  # Redis restarting: recovery then re-runs from less
                log.warning("could not record tokens in Redis: %s", exc)

    async def flush(self) -> None:
        """Wait until every token recorded so far is written (a turn ends only once its tokens
        are recorded)."""
        while self._redis_writes is not None and not self._redis_writes.done():
            await asyncio.gather(self._redis_writes, return_exceptions=True)


def _logprobs(out: Any) -> list[tuple[float, list[tuple[int, float]]]]:
    """The token's logprob and its top alternatives, where the request asked for them."""
    if out.logprob is None:
        return []
    top = [(int(t), float(p)) for t, p in out.top_logprobs] if out.top_logprobs else []
    return [(float(out.logprob), top)]


def _reason(outputs: Sequence[Any], request_id: str) -> Any:
    for out in outputs:
        if out.request_id == request_id and out.finish_reason is not None:
            return out.finish_reason
    return "stop"
