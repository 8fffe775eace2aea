"""One subscription on ``tokens.<gateway-id>`` fanned out to per-request queues.

Workers publish one TokenBatch per engine step with every request this gateway owns. The receive
callback only splits the batch and puts each event on its request's queue; the request's own
coroutine detokenizes and writes SSE, so a slow client never delays the others.
"""

from __future__ import annotations

import asyncio
import logging
import time

from nats.aio.msg import Msg

from aegaeon.bus import Bus
from aegaeon.protocol import TokenBatch, TokenEvent

log = logging.getLogger(__name__)

LOST_EVENTS_GRACE_S = 10.0
"""After a bus reconnect, how long a request may stay silent before it is ended with an error."""


class RequestStream:
    """The events of one request, in order, without duplicates."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self.received = 0  # output tokens seen so far
        self.last_event_at = time.monotonic()
        self.ended = False

    def fail(self, message: str) -> None:
        """End the stream with an explicit error (the gateway then cancels the request)."""
        if not self.ended:
            self.ended = True
            self.queue.put_nowait(
                TokenEvent(self.request_id, self.received, [], finish_reason="error", error=message)
            )

    def put(self, event: TokenEvent) -> None:
        """Queue an event, trimming tokens already seen (a recovery re-run may resend them)."""
        if self.ended:
            return
        self.last_event_at = time.monotonic()
        if event.start > self.received:
            # Tokens went missing in transit (core NATS is at-most-once, e.g. across a server
            # restart): the client must never see a gap, so the request ends explicitly.
            self.fail("tokens were lost in transit (message bus restart); please retry")
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


class StreamRouter:
    """rid → RequestStream, fed by the gateway's one token subscription."""

    def __init__(self) -> None:
        self.streams: dict[str, RequestStream] = {}
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

    def open(self, request_id: str) -> RequestStream:
        """Register before submitting, so no early token is lost."""
        stream = self.streams[request_id] = RequestStream(request_id)
        return stream

    def close(self, request_id: str) -> None:
        self.streams.pop(request_id, None)

    async def on_reconnect(self) -> None:
        """After a NATS reconnect, a request that hears nothing more within the grace period may
        have lost its last events while the bus was down: end it explicitly, never hang."""
        reconnected_at = time.monotonic()
        open_streams = list(self.streams.values())

        async def check_later() -> None:
            await asyncio.sleep(LOST_EVENTS_GRACE_S)
            for stream in open_streams:
                if stream.last_event_at < reconnected_at:
                    stream.fail("lost contact with the model during a message bus restart; retry")

        self._checks.add(task := asyncio.create_task(check_later()))
        task.add_done_callback(self._checks.discard)

    async def on_batch(self, batch: TokenBatch, _msg: Msg) -> None:
        for event in batch.events:
            stream = self.streams.get(event.request_id)
            if stream is not None:
                stream.put(event)
            # else: a request already closed (cancelled, stop string): late tokens are dropped
