"""One request's life after it is prepared: record, submit, turn token events into text, end.

``Generation.pieces()`` yields text deltas (incremental detokenization, stop strings) with their
token ids and logprobs; ``close()`` always runs (stream end, error, client gone) and leaves the
request in a final state: a cancel sent when the worker may still be generating, the Redis record
finished or deleted, the admission slot and unused token budget given back.

``RequestTimings`` is the one place where a request's arrival, first token and end are known
(the hook for metrics and tracing).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from aegaeon.bus import Bus
from aegaeon.protocol import (
    CancelRequest,
    RequestStatus,
    SubmitReply,
    SubmitRequest,
    TokenEvent,
)
from aegaeon.state import REQUEST_TTL_S, Keys

from .detokenizer import IncrementalDetokenizer, StopMatcher
from .errors import APIError
from .observe import RequestObserver
from .prepare import Prepared
from .streams import StreamRouter

log = logging.getLogger(__name__)

Logprob = tuple[float, list[tuple[int, float]]]


@dataclass
class RequestTimings:
    """Wall-clock times of one request (``time.time()``), and its output length."""

    arrival: float = field(default_factory=time.time)
    submitted: float | None = None
    first_token: float | None = None
    finished: float | None = None
    output_tokens: int = 0
    token_times: list[float] = field(default_factory=list)


@dataclass
class Piece:
    """New output of one request: text that is certain, the tokens behind it, the end."""

    text: str
    token_ids: list[int]
    logprobs: list[Logprob]
    finish_reason: str | None = None
    status: RequestStatus | None = None  # before the first token: where the request is


class EngineError(APIError):
    """The engine reported an error for this request."""

    def __init__(self, message: str) -> None:
        super().__init__(500, f"The model failed to generate: {message}", code="engine_error")


@dataclass
class Services:
    """What a Generation talks to: the gateway's connections and settings, without the rest of
    the Gateway."""

    bus: Bus
    redis: Redis
    router: StreamRouter
    keys: Keys
    gateway_id: str
    submit_timeout_s: float
    idle_timeout_s: float
    send_timeout_s: float
    on_close: Callable[[Generation], None]


class Generation:
    """A submitted request's stream of Pieces. Use ``submit()``, iterate ``pieces()``, then
    ``close()`` in a ``finally`` (shielded from cancellation by the caller)."""

    def __init__(self, services: Services, prepared: Prepared, api_key: str) -> None:
        self.s = services
        self.p = prepared
        self.api_key = api_key
        self.timings = RequestTimings()
        self.detok = IncrementalDetokenizer(prepared.tokenizer.decode)
        self.stop = StopMatcher(prepared.stops)
        self.finish_reason: str | None = None
        self.submitted = False
        self.queued_ahead = 0  # at admission: requests before it waiting for a first token
        self.failed = False  # the engine reported an error
        self.closed = False
        self.stream = services.router.open(prepared.request_id)
        self.observer: RequestObserver | None = None  # set once submitted (routes._serve)

    @property
    def request_id(self) -> str:
        return self.p.request_id

    async def _request_admission(self, request: SubmitRequest) -> SubmitReply:
        """Ask the scheduler. While none answers (one restarting takes a second or two), keep
        asking until the submit timeout, so a scheduler restart is invisible to new requests.
        Asked again after a bus reconnect (the answer may have been lost with a NATS server):
        the scheduler answers a request it has seen without running it twice."""
        bus = self.s.bus
        deadline = time.monotonic() + self.s.submit_timeout_s
        pause = 0.05
        while True:
            remaining = deadline - time.monotonic()
            try:
                return await bus.request_idempotent(
                    bus.subjects.submit, request, SubmitReply, max(remaining, 0.1)
                )
            except NoRespondersError:
                if remaining <= pause:
                    raise
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.5)

    async def submit(self) -> None:
        """Record in Redis and hand to the scheduler. Raises APIError (nothing left behind)."""
        try:
            await self._record_arrival()
        except RedisError as exc:
            log.warning("%s: Redis unavailable at arrival: %s", self.request_id, exc)
            raise APIError(503, "Request metadata store unavailable.", retry_after=1.0) from exc
        request = SubmitRequest(
            request_id=self.request_id,
            model=self.p.model.name,
            prompt_token_ids=self.p.prompt_ids,
            sampling=self.p.sampling,
            gateway_id=self.s.gateway_id,
            arrival_time=self.timings.arrival,
            api_key_id=self.api_key,
        )
        try:
            reply = await self._request_admission(request)
        except NoRespondersError as exc:
            raise APIError(503, "No scheduler is running; try again.", retry_after=1.0) from exc
        except (NatsTimeoutError, TimeoutError) as exc:
            # The scheduler may have accepted it after all: make sure it does not run.
            await self._cancel("abort")
            raise APIError(
                503, "The scheduler did not answer; try again.", retry_after=1.0
            ) from exc
        if not reply.accepted:
            raise APIError(
                reply.status if reply.status >= 400 else 503,
                reply.reason or "The request was not accepted.",
                retry_after=reply.retry_after,
            )
        self.submitted = True
        self.timings.submitted = time.time()
        self.queued_ahead = reply.queued_ahead

    async def pieces(self, statuses: bool = False) -> AsyncIterator[Piece]:
        """Output until the request ends; with ``statuses``, also where it waits before its
        first token (pieces with a ``status`` only). Raises EngineError / APIError on failure."""
        while self.finish_reason is None:
            event = await self._next_event()
            if event.status is not None and not event.token_ids and event.finish_reason is None:
                if statuses:
                    yield Piece("", [], [], status=event.status)
                continue
            piece = await self._piece(event)
            if piece.text or piece.token_ids or piece.finish_reason:
                yield piece

    async def _next_event(self) -> TokenEvent:
        try:
            return await asyncio.wait_for(self.stream.get(), self.s.idle_timeout_s)
        except TimeoutError:
            raise APIError(503, "The request timed out waiting for the model.") from None

    async def _piece(self, event: TokenEvent) -> Piece:
        if event.error or event.finish_reason == "error":
            self.failed = True
            raise EngineError(event.error or "unknown error")
        self._count_tokens(event)
        text = self.detok.feed(event.token_ids)
        finish = event.finish_reason
        if finish is not None:
            text += self.detok.finish()
        text = self.stop.feed(text)
        if self.stop.stopped:
            if finish is None:  # the worker is still generating: stop it
                await self._cancel("stop")
            finish = "stop"
        elif finish is not None:
            text += self.stop.flush()
        if finish == "abort":
            raise APIError(503, "The request was aborted by the server.")
        self.finish_reason = finish
        return Piece(text, list(event.token_ids), list(event.logprobs), finish)

    def _count_tokens(self, event: TokenEvent) -> None:
        if event.token_ids:
            now = time.time()
            if self.timings.first_token is None:
                self.timings.first_token = now
            self.timings.output_tokens += len(event.token_ids)
            self.timings.token_times.append(now)

    async def close(self) -> None:
        """Final state whatever happened; idempotent."""
        if self.closed:
            return
        self.closed = True
        self.timings.finished = time.time()
        self.s.router.close(self.request_id)
        try:
            if self.submitted and self.finish_reason is None:
                await self._cancel("abort")
            await self._record_end()
        except Exception:
            log.exception("%s: cleanup failed", self.request_id)
        finally:
            self.s.on_close(self)
            if self.observer is not None:
                self.observer.finished(self)

    async def _cancel(self, reason: str) -> None:
        bus = self.s.bus
        # A cancel lost with a crashing NATS server would leave the request running for nobody.
        await bus.publish_idempotent(bus.subjects.cancel, CancelRequest(self.request_id, reason))

    async def _record_arrival(self) -> None:
        key = self.s.keys.request(self.request_id)
        fields: dict[str, str | int | float] = {
            "state": "queued",
            "model": self.p.model.name,
            "gateway": self.s.gateway_id,
            "prompt_len": len(self.p.prompt_ids),
            "max_tokens": self.p.sampling.max_tokens,
            "arrival": self.timings.arrival,
            "api_key": self.api_key,
        }
        redis = self.s.redis
        async with redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping=fields)  # type: ignore[arg-type]
            pipe.expire(key, REQUEST_TTL_S)
            await pipe.execute()

    async def _record_end(self) -> None:
        key = self.s.keys.request(self.request_id)
        redis = self.s.redis
        if not self.submitted:
            await redis.delete(key)
            return
        fields: dict[str, str | int | float] = {
            "state": "finished" if self.finish_reason else "error" if self.failed else "cancelled",
            "finish_reason": self.finish_reason or ("error" if self.failed else "abort"),
            "output_len": self.timings.output_tokens,
            "finished_at": self.timings.finished or time.time(),
        }
        if self.timings.first_token is not None:
            fields["first_token_at"] = self.timings.first_token
        async with redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping=fields)  # type: ignore[arg-type]
            pipe.expire(key, REQUEST_TTL_S)
            await pipe.execute()
