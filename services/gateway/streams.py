"""One subscription on ``tokens.<gateway-id>`` fanned out to per-request queues.

Workers publish one TokenBatch per engine step with every request this gateway owns. The receive
callback only splits the batch and puts each event on its request's queue; the request's own
coroutine detokenizes and writes SSE, so a slow client never delays the others.

Core NATS is at-most-once: across a bus restart a request's events can be lost. The worker also
records every token it sends in Redis (``<prefix>:req:<id>:out``), so a gap is filled from there
(later events wait until it is), and a request that falls silent after a reconnect is completed
from there when it has ended meanwhile. Only what Redis cannot supply ends a stream with an error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from nats.aio.msg import Msg

from aegaeon.bus import Bus
from aegaeon.protocol import FinishReason, TokenBatch, TokenEvent

log = logging.getLogger(__name__)

LOST_EVENTS_GRACE_S = 10.0
"""After a bus reconnect, how long a request may stay silent before Redis is asked for its end."""
FINISHED: dict[str, FinishReason] = {"stop": "stop", "length": "length"}
"""Recorded finish reasons a stream is completed with (an error or abort ends it with an error)."""
RECOVER_TRIES = 30
RECOVER_WAIT_S = 0.1
"""Redis may trail the bus a little (the worker records tokens beside its next step)."""


@dataclass
class Recorded:
    """What Redis holds of a request: its output tokens from some index on, and, once it has
    ended, why and how many tokens it had in all."""

    tokens: list[int]
    finish_reason: str | None = None
    output_len: int | None = None


Recover = Callable[[str, int], Awaitable[Recorded]]
"""(request id, from index) → what Redis recorded from that index."""


class RequestStream:
    """The events of one request, in order, without duplicates."""

    def __init__(self, request_id: str, recover: Recover | None = None) -> None:
        self.request_id = request_id
        self.queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self.received = 0  # output tokens seen so far
        self.last_event_at = time.monotonic()
        self.ended = False
        self.recover = recover
        self.pending: list[TokenEvent] = []  # arrived past a gap being filled
        self.filling: asyncio.Task | None = None

    def fail(self, message: str) -> None:
        """End the stream with an explicit error (the gateway then cancels the request)."""
        if not self.ended:
            self.ended = True
            self.queue.put_nowait(
                TokenEvent(self.request_id, self.received, [], finish_reason="error", error=message)
            )

    def put(self, event: TokenEvent) -> None:
        """Queue an event, trimming tokens already seen (a recovery re-run may resend them).
        A status (where a request waiting for its first token is) matters only until then."""
        if self.ended:
            return
        self.last_event_at = time.monotonic()
        if event.status is not None and not event.token_ids and event.finish_reason is None:
            if self.received == 0 and self.filling is None and not event.error:
                self.queue.put_nowait(event)
            return
        if self.filling is not None or event.start > self.received:
            # Tokens went missing in transit: the client must never see a gap. Fill it from
            # Redis; what arrives meanwhile waits its turn.
            self.pending.append(event)
            if self.filling is None:
                if self.recover is None:
                    self.fail("tokens were lost in transit (message bus restart); please retry")
                    return
                self.filling = asyncio.get_running_loop().create_task(self._fill(event.start))
            return
        if event.finish_reason is not None or event.error:
            self.ended = True
        overlap = self.received - event.start
        if overlap > 0:
            if overlap >= len(event.token_ids) and event.finish_reason is None and not event.error:
                return
            event = TokenEvent(
                request_id=event.request_id,
                start=self.received,
                token_ids=event.token_ids[overlap:],
                logprobs=event.logprobs[overlap:],
                finish_reason=event.finish_reason,
                error=event.error,
            )
        self.received += len(event.token_ids)
        self.queue.put_nowait(event)

    async def get(self) -> TokenEvent:
        return await self.queue.get()

    async def _fill(self, until: int) -> None:
        """Tokens [received, until) from Redis, then the events that waited."""
        missing = await self._recorded(lambda r: len(r.tokens) >= until - self.received)
        self.filling = None
        if missing is None:
            self.fail("tokens were lost in transit (message bus restart); please retry")
            return
        # Redis records ids only: these tokens come without logprobs (null in the response).
        self.put(
            TokenEvent(self.request_id, self.received, missing.tokens[: until - self.received])
        )
        pending, self.pending = self.pending, []
        for event in pending:
            self.put(event)

    async def complete_from_record(self) -> None:
        """Silent since a bus restart: end the stream as Redis says it ended, else with an
        error (it may have lost its last events while the bus was down)."""

        def ended(r: Recorded) -> bool:
            return r.finish_reason is not None and self.received + len(r.tokens) >= (
                r.output_len or 0
            )

        found = await self._recorded(ended) if self.recover is not None else None
        reason = FINISHED.get(found.finish_reason or "") if found is not None else None
        if found is None or reason is None:
            self.fail("lost contact with the model during a message bus restart; retry")
            return
        self.put(TokenEvent(self.request_id, self.received, found.tokens, finish_reason=reason))

    async def _recorded(self, enough: Callable[[Recorded], bool]) -> Recorded | None:
        assert self.recover is not None
        for _ in range(RECOVER_TRIES):
            try:
                found = await self.recover(self.request_id, self.received)
            except Exception as exc:  # Redis restarting too: try again
                log.info("recovering %s from Redis: %s", self.request_id, exc)
            else:
                if enough(found):
                    return found
            await asyncio.sleep(RECOVER_WAIT_S)
        return None


class StreamRouter:
    """rid → RequestStream, fed by the gateway's one token subscription."""

    def __init__(self, recover: Recover | None = None) -> None:
        self.streams: dict[str, RequestStream] = {}
        self.recover = recover
        self._subscription = None
        self._checks: set[asyncio.Task] = set()

    async def start(self, bus: Bus, gateway_id: str) -> None:
        self._subscription = await bus.subscribe(
            bus.subjects.tokens(gateway_id), TokenBatch, self.on_batch
        )

    async def stop(self) -> None:
        if self._subscription is not None:
            await self._subscription.unsubscribe()
            self._subscription = None
        checks = list(self._checks)  # after-reconnect checks still sleeping: nobody reads them
        for task in checks:
            task.cancel()
        await asyncio.gather(*checks, return_exceptions=True)

    def open(self, request_id: str) -> RequestStream:
        """Register before submitting, so no early token is lost."""
        stream = self.streams[request_id] = RequestStream(request_id, self.recover)
        return stream

    def close(self, request_id: str) -> None:
        stream = self.streams.pop(request_id, None)
        if stream is not None and stream.filling is not None:
            stream.filling.cancel()  # nobody reads it any more

    async def on_reconnect(self) -> None:
        """After a NATS reconnect, a request that hears nothing more within the grace period may
        have lost its last events while the bus was down: end it explicitly, never hang."""
        reconnected_at = time.monotonic()
        open_streams = list(self.streams.values())

        async def check_later() -> None:
            await asyncio.sleep(LOST_EVENTS_GRACE_S)
            silent = [s for s in open_streams if s.last_event_at < reconnected_at and not s.ended]
            await asyncio.gather(*(stream.complete_from_record() for stream in silent))

        self._checks.add(task := asyncio.create_task(check_later()))
        task.add_done_callback(self._checks.discard)

    async def on_batch(self, batch: TokenBatch, _msg: Msg) -> None:
        for event in batch.events:
            stream = self.streams.get(event.request_id)
            if stream is not None:
                stream.put(event)
            # else: a request already closed (cancelled, stop string): late tokens are dropped
