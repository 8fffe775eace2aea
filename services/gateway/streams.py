"""One subscription on ``tokens.<gateway-id>`` fanned out to per-request queues.

Workers publish one TokenBatch per engine step with every request this gateway owns. The receive
callback only splits the batch and puts each event on its request's queue; the request's own
coroutine detokenizes and writes SSE, so a slow client never delays the others.
"""

from __future__ import annotations

import asyncio
import logging

from nats.aio.msg import Msg

from aegaeon.bus import Bus
from aegaeon.protocol import TokenBatch, TokenEvent

log = logging.getLogger(__name__)


class RequestStream:
    """The events of one request, in order, without duplicates."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self.received = 0  # output tokens seen so far

    def put(self, event: TokenEvent) -> None:
        """Queue an event, trimming tokens already seen (a recovery re-run may resend them)."""
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

    async def on_batch(self, batch: TokenBatch, _msg: Msg) -> None:
        for event in batch.events:
            stream = self.streams.get(event.request_id)
            if stream is not None:
                stream.put(event)
            # else: a request already closed (cancelled, stop string): late tokens are dropped
