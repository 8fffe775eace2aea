"""Answering with the Choices of a request: an SSE stream, or one JSON body; both cancel on
disconnect.

A client that goes away must cancel its request at once, even while it is still queued and no
token has been sent (a write would reveal the disconnect only at the next token). So both paths
listen for ``http.disconnect`` alongside the work, and every choice's Generation is closed in a
finally shielded from cancellation: the CancelRequests and the final Redis writes always happen.
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

from .choices import Choices
from .cluster import ClusterView
from .errors import APIError
from .generation import Piece
from .responses import DONE, ResponseBuilder, sse, sse_comment, whole_response

log = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class EventStreamResponse(StreamingResponse):
    """An SSE response that stops streaming as soon as the client disconnects, or stops taking
    what is written (a write blocked past ``send_timeout_s``: a client holding its slot without
    reading), and then runs ``choices.close()`` (starlette's own only notices a disconnect on
    a failed write)."""

    def __init__(self, body: AsyncIterator[str], choices: Choices) -> None:
        super().__init__(body, media_type="text/event-stream", headers=SSE_HEADERS)
        self.choices = choices

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        timeout = self.choices.first.s.send_timeout_s

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
                                     self.choices.first.p.response_id, timeout)  # fmt: skip
                    group.cancel_scope.cancel()

                group.start_soon(stream_then_stop)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        except OSError:
            pass  # the connection broke while listening: same as a disconnect
        finally:
            with anyio.CancelScope(shield=True):
                await self.choices.close()


async def sse_body(choices: Choices) -> AsyncIterator[str]:
    """Chunks as OpenAI sends them, each choice's under its index; an error mid-stream becomes
    an error chunk, then [DONE]."""
    builders = [ResponseBuilder(g.p) for g in choices.generations]
    first = choices.first
    try:
        for builder in builders:
            role = builder.first_chunk()
            if role:
                yield role
        yield sse_comment(RequestStatus("queued", position=first.queued_ahead))
        async for index, piece in choices.pieces(statuses=True):
            if piece.status is not None:
                yield sse_comment(piece.status)
                continue
            chunk = builders[index].chunk(piece)
            if chunk:
                yield chunk
        if first.p.include_usage:
            yield builders[0].usage_chunk(choices.prompt_tokens, choices.output_tokens)
    except APIError as exc:
        yield sse(exc.body())
    except Exception:
        # Headers are sent: the error can only travel in the stream, never as a traceback.
        log.exception("%s: stream failed", first.p.response_id)
        yield sse(APIError(500, "The server had an error while streaming.").body())
    yield DONE


def stream(choices: Choices) -> EventStreamResponse:
    return EventStreamResponse(sse_body(choices), choices)


async def complete(request: Request, choices: Choices) -> JSONResponse:
    """Collect the whole output; a disconnect while waiting cancels the request."""
    try:
        work = asyncio.ensure_future(_collect(choices))
        gone = asyncio.ensure_future(_disconnected(request))
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if not work.done():
            work.cancel()
            return APIError(499, "Client closed the request.").response()  # nobody reads it
        pieces = work.result()
        builders = [ResponseBuilder(g.p) for g in choices.generations]
        tokens = choices.prompt_tokens, choices.output_tokens
        return JSONResponse(whole_response(builders, pieces, *tokens))
    finally:
        with anyio.CancelScope(shield=True):
            await choices.close()


async def _collect(choices: Choices) -> list[list[Piece]]:
    """Each choice's pieces, in choice order."""
    pieces: list[list[Piece]] = [[] for _ in choices.generations]
    async for index, piece in choices.pieces():
        pieces[index].append(piece)
    return pieces


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
