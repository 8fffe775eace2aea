"""Answering with a Generation: an SSE stream, or one JSON body; both cancel on disconnect.

A client that goes away must cancel its request at once, even while it is still queued and no
token has been sent (a write would reveal the disconnect only at the next token). So both paths
listen for ``http.disconnect`` alongside the work, and the Generation is closed in a finally
shielded from cancellation: the CancelRequest and the final Redis write always happen.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from aegaeon.protocol import RequestStatus
from aegaeon.runtime_view import shows

from .cluster import ClusterView
from .errors import APIError
from .generation import Generation, Piece
from .responses import DONE, ResponseBuilder, sse, sse_comment

log = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class EventStreamResponse(StreamingResponse):
    """An SSE response that stops streaming as soon as the client disconnects, or stops taking
    what is written (a write blocked past ``send_timeout_s``: a client holding its slot without
    reading), and then runs ``generation.close()`` (starlette's own only notices a disconnect on
    a failed write)."""

    def __init__(self, body: AsyncIterator[str], generation: Generation) -> None:
        super().__init__(body, media_type="text/event-stream", headers=SSE_HEADERS)
        self.generation = generation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        timeout = self.generation.s.send_timeout_s

        async def bounded_send(message: Message) -> None:
            with anyio.fail_after(timeout):  # TimeoutError (an OSError): handled below
                await send(message)

        try:
            async with anyio.create_task_group() as group:

                async def stream_then_stop() -> None:
                    try:
                        await self.stream_response(bounded_send)
                    except OSError as exc:  # the connection broke, or a write timed out
                        if isinstance(exc, TimeoutError):
                            log.info("%s: client stopped reading for %.0f s",
                                     self.generation.request_id, timeout)  # fmt: skip
                    group.cancel_scope.cancel()

                group.start_soon(stream_then_stop)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        except OSError:
            pass  # the connection broke while listening: same as a disconnect
        finally:
            with anyio.CancelScope(shield=True):
                await self.generation.close()


async def sse_body(generation: Generation, builder: ResponseBuilder) -> AsyncIterator[str]:
    """Chunks as OpenAI sends them; an error mid-stream becomes an error chunk, then [DONE]."""
    try:
        first = builder.first_chunk()
        if first:
            yield first
        yield sse_comment(RequestStatus("queued", position=generation.queued_ahead))
        async for piece in generation.pieces(statuses=True):
            if piece.status is not None:
                yield sse_comment(piece.status)
                continue
            chunk = builder.chunk(piece)
            if chunk:
                yield chunk
        if generation.p.include_usage:
            yield builder.usage_chunk(generation.timings.output_tokens)
    except APIError as exc:
        yield sse(exc.body())
    except Exception:
        # Headers are sent: the error can only travel in the stream, never as a traceback.
        log.exception("%s: stream failed", generation.request_id)
        yield sse(APIError(500, "The server had an error while streaming.").body())
    yield DONE


def stream(generation: Generation) -> EventStreamResponse:
    return EventStreamResponse(sse_body(generation, ResponseBuilder(generation.p)), generation)


async def complete(request: Request, generation: Generation) -> JSONResponse:
    """Collect the whole output; a disconnect while waiting cancels the request."""
    try:
        work = asyncio.ensure_future(_collect(generation))
        gone = asyncio.ensure_future(_disconnected(request))
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if not work.done():
            work.cancel()
            return APIError(499, "Client closed the request.").response()  # nobody reads it
        pieces = work.result()
        body = ResponseBuilder(generation.p).complete(pieces, generation.timings.output_tokens)
        return JSONResponse(body)
    finally:
        with anyio.CancelScope(shield=True):
            await generation.close()


async def _collect(generation: Generation) -> list[Piece]:
    return [piece async for piece in generation.pieces()]


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


EVENTS_KEEPALIVE_S = 15.0


async def event_stream(
    request: Request, cluster: ClusterView, visible: Callable[[str], bool]
) -> AsyncIterator[str]:
    """The runtime view's events (those naming only ``visible`` models) as SSE until the client
    goes away (``/v1/aegaeon/events``)."""
    queue: asyncio.Queue[dict] = asyncio.Queue()
    cluster.watchers.add(queue)
    try:
        yield ": aegaeon events\n\n"  # headers and a first line at once
        while not await request.is_disconnected():
            try:
                record = await asyncio.wait_for(queue.get(), EVENTS_KEEPALIVE_S)
            except TimeoutError:
                yield ": keep-alive\n\n"
                continue
            if shows(record, visible):
                yield sse(record)
    finally:
        cluster.watchers.discard(queue)
