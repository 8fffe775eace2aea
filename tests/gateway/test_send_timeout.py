"""A client that stops reading its stream (the write blocks) loses its request after the send
timeout: the generation is closed, so its slot and its unused tokens go back."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from aegaeon.gateway.choices import Choices
from aegaeon.gateway.streaming import EventStreamResponse


class Generation:
    """What the response needs of a generation: its settings, its ids, and close()."""

    def __init__(self) -> None:
        self.s = SimpleNamespace(send_timeout_s=0.2)
        self.p = SimpleNamespace(response_id="cmpl-test")
        self.request_id = "cmpl-test"
        self.closed = asyncio.Event()

    async def close(self) -> None:
        self.closed.set()


async def endless_body():
    while True:
        yield "data: {}\n\n"


async def test_a_write_the_client_never_takes_ends_the_request():
    generation = Generation()
    response = EventStreamResponse(endless_body(), Choices([generation]))  # type: ignore[list-item]
    writes = []

    async def send(message) -> None:
        writes.append(message["type"])
        if len(writes) > 3:  # the client's window is full: the write never completes
            await asyncio.Event().wait()

    async def receive():
        await asyncio.Event().wait()  # no disconnect: the client is there, just not reading

    await asyncio.wait_for(response({"type": "http"}, receive, send), 5)
    assert generation.closed.is_set()
    assert writes[0] == "http.response.start" and len(writes) == 4
