"""The gateway's HTTP connections (``http_protocol``): a connection that sends no complete request
head in time is closed (an idle or trickling client cannot hold a socket for ever), while a
response or a body that takes longer is never cut. A real uvicorn server on a free port, run
with the gateway's own settings (``main.server_config``) and a short deadline."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
import pytest
import uvicorn
from aegaeon.gateway.http_protocol import HeadDeadlineProtocol, head_deadline_protocol
from aegaeon.gateway.main import server_config

from aegaeon.servers import free_port

pytestmark = pytest.mark.timeout(60)

DEADLINE_S = 0.5
GAP_S = 0.3  # between a slow response's chunks: three of them outlast the deadline


async def slow_app(scope, receive, send) -> None:
    """Answers ``/slow`` in three chunks GAP_S apart, anything else at once (after its body)."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": []})
    if scope["path"] == "/slow":
        for chunk in (b"a", b"b"):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await asyncio.sleep(GAP_S)
    await send({"type": "http.response.body", "body": b"c"})


@pytest.fixture
async def server() -> AsyncIterator[int]:
    port = free_port()
    protocol = head_deadline_protocol(DEADLINE_S)
    config = server_config(slow_app, "127.0.0.1", port, log_level="warning", lifespan="off", http=protocol)  # fmt: skip
    running = uvicorn.Server(config)
    task = asyncio.create_task(running.serve())
    while not running.started:
        await asyncio.sleep(0.02)
    try:
        yield port
    finally:
        running.should_exit = True
        await task


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    """The server closed the connection (end of stream) within a bound far past the deadline."""
    with contextlib.suppress(ConnectionResetError):
        return await asyncio.wait_for(reader.read(), 20 * DEADLINE_S + 5) == b""
    return True


def test_the_gateway_serves_with_the_head_deadline() -> None:
    assert server_config(slow_app, "127.0.0.1", 0).http is HeadDeadlineProtocol


async def test_a_connection_that_never_sends_a_request_is_closed(server) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server)
    try:
        assert await closed_by_server(reader)
    finally:
        writer.close()


async def test_a_request_head_trickled_in_is_closed_before_it_completes(server) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server)
    writer.write(b"GET / HTTP/1.1\r\nHost: gateway\r\n")

    async def trickle() -> None:  # one more header line, again and again, never the blank line
        for i in range(10_000):
            writer.write(f"X-Slow-{i}: 1\r\n".encode())
            await writer.drain()
            await asyncio.sleep(DEADLINE_S / 5)

    sending = asyncio.create_task(trickle())
    try:
        assert await closed_by_server(reader)
    finally:
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await sending
        writer.close()


async def test_a_response_that_outlasts_the_deadline_completes_and_keep_alive_goes_on(server) -> None:  # fmt: skip
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server}") as client:
        slow = await client.get("/slow")  # 2 × GAP_S > DEADLINE_S
        assert slow.status_code == 200 and slow.content == b"abc"
        again = await client.get("/")  # the same connection, within the deadline
        assert again.status_code == 200 and again.content == b"c"


async def test_a_body_that_takes_longer_than_the_deadline_is_read_whole(server) -> None:
    async def slow_body() -> AsyncIterator[bytes]:
        for part in (b"x" * 10, b"y" * 10, b"z" * 10):
            yield part
            await asyncio.sleep(GAP_S)

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server}") as client:
        answer = await client.post("/", content=slow_body())
        assert answer.status_code == 200 and answer.content == b"c"
