"""What a gateway sends while its NATS server crashes is not lost. A submit whose answer is lost
while the gateway's bus connection is down is asked again once the connection is back, and the
request is served: not a 503 after the submit timeout. A cancel the crashed server took with it
is sent again: the request does not run on for nobody. The gateway reaches the real nats-server
through a relay the test cuts; the backend (scheduler) reaches it directly."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
from nats_relay import Relay

from .conftest import Stack, serve_stack
from .fake_backend import Script


async def relayed_stack(
    nats_server, redis_server, tiny_model, prefix: str, **settings
) -> AsyncIterator[tuple[Relay, Stack]]:
    """A stack whose gateway reaches NATS through a relay the test cuts (or makes swallow)."""
    relay = Relay(nats_server.port)
    relay_url = f"nats://127.0.0.1:{await relay.start()}"
    try:
        async for stack in serve_stack(
            nats_server, redis_server, tiny_model, prefix, gateway_nats_url=relay_url, **settings
        ):
            yield relay, stack
    finally:
        relay.close()


async def test_a_submit_answer_lost_in_a_bus_reconnect_is_asked_for_again(
    nats_server, redis_server, tiny_model
):
    async for relay, stack in relayed_stack(
        nats_server, redis_server, tiny_model, "resubmit", submit_timeout_s=30.0
    ):
        backend = stack.backend
        backend.script = Script(unanswered=1)  # the first answer is never sent
        async with httpx.AsyncClient(base_url=stack.base_url, timeout=120) as http:
            body = {"model": "tiny", "prompt": "x", "max_tokens": 5}
            asked = asyncio.create_task(http.post("/v1/completions", json=body))
            while not backend.submitted and not asked.done():
                await asyncio.sleep(0.01)
            relay.cut()  # as a crashed server: the gateway reconnects, through the relay
            response = await asked
        assert response.status_code == 200, response.text
        first, again = backend.submitted
        assert again == first  # the same submit (same request id), sent once more
        text = response.json()["choices"][0]["text"]
        assert text and response.json()["usage"]["completion_tokens"] == 5
        await stack.settle()


async def test_a_cancel_lost_with_a_crashed_nats_server_is_sent_again(
    nats_server, redis_server, tiny_model
):
    async for relay, stack in relayed_stack(nats_server, redis_server, tiny_model, "recancel"):
        backend = stack.backend
        backend.script = Script(hang=True)  # accepted, no token: the client gives up
        async with httpx.AsyncClient(base_url=stack.base_url) as http:
            body = {"model": "tiny", "prompt": "x", "max_tokens": 5}
            asked = asyncio.create_task(http.post("/v1/completions", json=body, timeout=1))
            while not backend.submitted and not asked.done():
                await asyncio.sleep(0.01)
            relay.swallowing = True  # the server takes what the gateway sends, then crashes
            with pytest.raises(httpx.ReadTimeout):
                await asked
        while not any(b"requests.cancel" in chunk for chunk in relay.swallowed):
            await asyncio.sleep(0.01)
        relay.swallowing = False
        relay.cut()
        rid = backend.submitted[-1].request_id
        assert [c.reason for c in await backend.cancels_of(rid)] == ["abort"]
        await stack.settle()
