"""The benchmarks' streaming client: how each way a request can end is classified (finished,
refused in words, or lost), through the real SSE parser over httpx's in-process transport."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import httpx
import pytest

from aegaeon.bench.client import StreamTiming, classify, stream_completion

URL = "http://gateway.test"


def sse(*chunks: dict | str) -> bytes:
    lines = [f"data: {c if isinstance(c, str) else json.dumps(c)}\n\n" for c in chunks]
    return "".join(lines).encode()


def text(value: str, finish: str | None = None) -> dict:
    return {"id": "cmpl-1", "choices": [{"index": 0, "text": value, "finish_reason": finish}]}


def run(handler: Callable[[httpx.Request], httpx.Response], timeout: float = 5.0) -> StreamTiming:
    async def go() -> StreamTiming:
        transport = httpx.MockTransport(handler)
        async with httpx.AsyncClient(transport=transport, timeout=timeout) as client:
            return await stream_completion(client, URL, "m", [20, 21, 22], 3)

    return asyncio.run(go())


def answer(status: int, body: bytes) -> Callable[[httpx.Request], httpx.Response]:
    return lambda request: httpx.Response(status, content=body)


def test_a_stream_with_a_finish_reason_and_done_is_finished_and_its_empty_last_chunk_is_no_token() -> None:  # fmt: skip
    body = sse(text("a"), text("b"), text("c"), text("", "length"), "[DONE]")
    timing = run(answer(200, body))
    assert classify(timing) == "finished"
    assert timing.finish_reason == "length" and timing.request_id == "cmpl-1"
    assert len(timing.token_times) == len(timing.wall_times) == 3


def test_every_token_asks_for_logprobs_and_times_each_token_even_one_without_text() -> None:
    """A token whose text the detokenizer holds back (half a character) comes in a chunk with
    empty text: counted by its logprobs entry, so the k-th time is the k-th token's."""
    asked: list[dict] = []

    def chunk(value: str, tokens: list[str], finish: str | None = None) -> dict:
        logprobs = {"tokens": tokens, "token_logprobs": [-0.1] * len(tokens)} if tokens else None
        choice = {"index": 0, "text": value, "logprobs": logprobs, "finish_reason": finish}
        return {"id": "cmpl-1", "choices": [choice]}

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(json.loads(request.content))
        body = sse(chunk("a", ["a"]), chunk("", ["\xe2"]), chunk("é", ["\x82"]),
                   chunk("", [], "length"), "[DONE]")  # fmt: skip
        return httpx.Response(200, content=body)

    async def go() -> StreamTiming:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await stream_completion(client, URL, "m", [20, 21], 3, every_token=True)

    timing = asyncio.run(go())
    assert asked[0]["logprobs"] == 0
    assert classify(timing) == "finished"
    assert len(timing.token_times) == len(timing.wall_times) == 3
    plain = run(answer(200, sse(text("a"), text(""), text("é"), text("", "length"), "[DONE]")))
    assert len(plain.token_times) == 2  # without logprobs only the chunks with text count


def test_429_and_503_are_refused() -> None:
    assert classify(run(answer(429, b'{"error": {"message": "slow down"}}'))) == "refused"
    assert classify(run(answer(503, b'{"error": {"message": "busy"}}'))) == "refused"


def test_an_explicit_error_event_in_the_stream_is_refused() -> None:
    body = sse(text("a"), {"error": {"message": "timed out waiting for the model"}}, "[DONE]")
    timing = run(answer(200, body))
    assert classify(timing) == "refused" and timing.error_event


def test_a_stream_that_ends_without_a_finish_reason_is_lost() -> None:
    assert classify(run(answer(200, sse(text("a"), text("b"))))) == "lost"  # no [DONE]
    assert classify(run(answer(200, sse(text("a"), "[DONE]")))) == "lost"  # no finish reason


def test_a_transport_error_is_lost_even_after_the_stream_began() -> None:
    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    class BreaksOff(httpx.AsyncByteStream):
        async def __aiter__(self):  # type: ignore[override]
            yield sse(text("a"))
            raise httpx.ReadError("connection reset")

    assert classify(run(refused)) == "lost"
    broken = run(lambda request: httpx.Response(200, stream=BreaksOff()))
    assert broken.status == 200 and not broken.error_event
    assert classify(broken) == "lost"


def test_a_stream_that_hangs_past_the_client_timeout_is_lost() -> None:
    # What httpx raises when a read waits past the client timeout, mid-stream.
    class TimesOut(httpx.AsyncByteStream):
        async def __aiter__(self):  # type: ignore[override]
            yield sse(text("a"))
            raise httpx.ReadTimeout("read timed out")

    timing = run(lambda request: httpx.Response(200, stream=TimesOut()))
    assert classify(timing) == "lost" and "ReadTimeout" in timing.error


@pytest.mark.parametrize("status", [400, 500, 502])
def test_other_http_statuses_are_lost(status: int) -> None:
    assert classify(run(answer(status, b"{}"))) == "lost"


def test_a_chunk_that_is_not_json_is_lost() -> None:
    assert classify(run(answer(200, b"data: {not json\n\n"))) == "lost"
