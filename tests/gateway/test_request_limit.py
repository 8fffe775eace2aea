"""Past its HTTP request limit (``AEGAEON_MAX_IN_FLIGHT`` + headroom) the gateway answers 503 as
OpenAI clients expect it: a JSON error with Retry-After, never uvicorn's plain-text refusal; and
idle keep-alive connections hold no slot."""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import openai
import pytest
from aegaeon.gateway.app import RequestLimit
from aegaeon.gateway.settings import GatewaySettings
from openai import AsyncOpenAI

from .conftest import serve_stack

pytestmark = pytest.mark.timeout(60)

HTTP = {"type": "http", "method": "GET", "path": "/", "headers": []}


class Held:
    """An ASGI app whose requests wait until released, after saying they arrived."""

    def __init__(self) -> None:
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, scope, receive, send) -> None:
        self.arrived.set()
        await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


async def call(app, scope=HTTP) -> list[dict]:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


async def test_a_request_past_the_limit_is_refused_until_one_in_progress_ends():
    held = Held()
    limit = RequestLimit(held, limit=1, retry_after_s=1.0)
    first = asyncio.create_task(call(limit))
    await held.arrived.wait()
    start, body = await call(limit)
    assert start["status"] == 503
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    assert headers["retry-after"] == "1" and headers["connection"] == "close"
    assert headers["content-type"] == "application/json"
    assert b'"type":"overloaded_error"' in body["body"]
    held.release.set()
    assert (await first)[0]["status"] == 200
    assert (await call(limit))[0]["status"] == 200 and limit.active == 0


def test_the_limit_is_the_admission_bound_plus_the_headroom_both_from_the_environment(monkeypatch):
    monkeypatch.setenv("AEGAEON_MAX_IN_FLIGHT", "10")
    monkeypatch.setenv("AEGAEON_REQUEST_HEADROOM", "3")
    assert GatewaySettings().max_requests == 13
    monkeypatch.setenv("AEGAEON_REQUEST_HEADROOM", "-1")
    with pytest.raises(ValueError, match="request_headroom"):
        GatewaySettings()


async def test_health_and_metrics_probes_are_answered_when_the_limit_is_reached():
    held = Held()
    limit = RequestLimit(held, limit=1, retry_after_s=1.0)
    first = asyncio.create_task(call(limit))
    await held.arrived.wait()
    assert (await call(limit))[0]["status"] == 503
    for path in ("/health", "/metrics"):
        held.arrived.clear()
        probe = asyncio.create_task(call(limit, HTTP | {"path": path}))
        await asyncio.wait_for(held.arrived.wait(), 10)  # it reached the app: not refused
        assert limit.active == 1
    held.release.set()
    await first
    await probe


async def test_a_failing_request_gives_its_slot_back_and_lifespan_is_not_counted():
    async def failing(scope, receive, send) -> None:
        raise RuntimeError("boom")

    limit = RequestLimit(failing, limit=1, retry_after_s=1.0)
    with pytest.raises(RuntimeError):
        await call(limit)
    assert limit.active == 0
    held = Held()
    lifespan = RequestLimit(held, limit=1, retry_after_s=1.0)
    task = asyncio.create_task(call(lifespan, {"type": "lifespan"}))
    await held.arrived.wait()
    assert lifespan.active == 0
    held.release.set()
    await task


@pytest.fixture
async def small_stack(nats_server, redis_server, tiny_model):
    """One request in flight, one more in progress: a limit of two HTTP requests."""
    async for stack in serve_stack(
        nats_server, redis_server, tiny_model, "reqlimit", max_in_flight=1, request_headroom=1
    ):
        yield stack


async def test_requests_past_the_limit_get_an_openai_503_with_retry_after(small_stack):
    async with contextlib.AsyncExitStack() as streams:
        http = await streams.enter_async_context(httpx.AsyncClient(base_url=small_stack.base_url))
        for _ in range(2):  # runtime event streams: in progress until the client leaves
            opened = http.stream("GET", "/v1/aegaeon/events")
            assert (await streams.enter_async_context(opened)).status_code == 200
        async with httpx.AsyncClient(base_url=small_stack.base_url) as other:
            refused = await other.get("/v1/models")
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["type"] == "overloaded_error"
        client = AsyncOpenAI(base_url=small_stack.base_url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.InternalServerError) as raised:
            await client.models.list()
        assert raised.value.status_code == 503
        assert raised.value.body["type"] == "overloaded_error"  # the SDK read the JSON error


async def test_idle_keep_alive_connections_hold_no_slot(small_stack):
    async with contextlib.AsyncExitStack() as idle:
        for _ in range(3):  # each client keeps its connection open after its request
            http = await idle.enter_async_context(httpx.AsyncClient(base_url=small_stack.base_url))
            response = await http.get("/v1/models")
            assert response.status_code == 200, response.text
            assert response.headers.get("connection") != "close"
        async with httpx.AsyncClient(base_url=small_stack.base_url) as http:
            assert (await http.get("/v1/models")).status_code == 200
