"""The gateway through the official openai client, against a fake scheduler/worker on real NATS
and Redis: streaming and not, both endpoints, usage, stop strings, logprobs, cancel."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from openai import AsyncOpenAI
from prometheus_client import REGISTRY

from aegaeon.protocol import RequestStatus, SubmitReply

from .fake_backend import Script

pytestmark = pytest.mark.timeout(60)


def client(stack) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=stack.base_url + "/v1", api_key="unused", max_retries=0)


def expected_text(stack, tiny_tokenizer, max_tokens: int) -> str:
    ids = stack.backend.expected_ids(max_tokens)
    return tiny_tokenizer.decode(ids, skip_special_tokens=True)


async def test_chat_stream_text_equals_decode_of_the_generated_tokens(stack, tiny_tokenizer):
    stream = await client(stack).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], stream=True, temperature=0
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == expected_text(stack, tiny_tokenizer, 10**6)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert "\ufffd" not in text
    submitted = stack.backend.submitted[-1]
    assert submitted.sampling.temperature == 0
    assert submitted.sampling.stop_token_ids == [tiny_tokenizer.convert_tokens_to_ids("<|eos|>")]
    expected_prompt = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert tiny_tokenizer.decode(submitted.prompt_token_ids) == expected_prompt


async def test_a_waiting_stream_says_where_it_is_in_comments_the_openai_client_skips(
    stack, tiny_tokenizer
):
    stack.backend.script = Script(queued_ahead=2, statuses=[
        RequestStatus("queued", position=1, model="tiny"),
        RequestStatus("loading", model="tiny", bytes_done=0, bytes_total=1000),
    ])  # fmt: skip
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with (
        httpx.AsyncClient(base_url=stack.base_url) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        lines = [line async for line in response.aiter_lines() if line]
    content = next(i for i, line in enumerate(lines) if '"content":"' in line and '"content":""' not in line)  # fmt: skip
    assert lines[:content] == [
        lines[0],  # the role delta
        ": aegaeon queued position=2",
        ": aegaeon queued position=1 model=tiny",
        ": aegaeon loading model=tiny bytes_done=0 bytes_total=1000",
    ]
    assert lines[0].startswith("data: ") and not any(line.startswith(":") for line in lines[content:])  # fmt: skip
    stream = await client(stack).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream])
    assert text == expected_text(stack, tiny_tokenizer, 10**6)
    reply = await client(stack).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.choices[0].message.content == text


async def test_chat_without_stream_returns_message_and_usage(stack, tiny_tokenizer):
    reply = await client(stack).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=7
    )
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.content == expected_text(stack, tiny_tokenizer, 7)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 7
    assert reply.usage.prompt_tokens == len(stack.backend.submitted[-1].prompt_token_ids)


async def test_completion_stream_with_include_usage_ends_with_a_usage_chunk(stack, tiny_tokenizer):
    stream = await client(stack).completions.create(
        model="tiny",
        prompt="The quick brown",
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].text for c in chunks[:-1])
    assert text == expected_text(stack, tiny_tokenizer, 12)
    assert chunks[-2].choices[0].finish_reason == "length"


async def test_completion_accepts_token_ids_as_prompt(stack, tiny_tokenizer):
    ids = tiny_tokenizer("héllo wörld", add_special_tokens=False)["input_ids"]
    reply = await client(stack).completions.create(model="tiny", prompt=ids, max_tokens=5)
    assert stack.backend.submitted[-1].prompt_token_ids == ids
    assert reply.choices[0].text == expected_text(stack, tiny_tokenizer, 5)
    assert reply.usage.prompt_tokens == len(ids)


async def test_stop_string_ends_the_output_before_it_and_cancels_the_worker(stack):
    reply = await client(stack).completions.create(
        model="tiny", prompt="x", max_tokens=100, stop=["STOP"], temperature=0
    )
    assert reply.choices[0].text == "Hello wörld, 日本語 🙂 and the quick brown fox. "
    assert reply.choices[0].finish_reason == "stop"
    await stack.settle()
    rid = stack.backend.submitted[-1].request_id
    assert [c.reason for c in await stack.backend.cancels_of(rid)] == ["stop"]


async def test_streamed_stop_string_is_never_sent_even_in_part(stack):
    stream = await client(stack).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "x"}], stop="STOP here", stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream])
    assert text == "Hello wörld, 日本語 🙂 and the quick brown fox. "


async def test_chat_logprobs_come_per_token(stack):
    reply = await client(stack).chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "x"}],
        max_tokens=4,
        logprobs=True,
        top_logprobs=2,
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == 4
    assert content[0].logprob == -0.5 and len(content[0].top_logprobs) == 2
    assert stack.backend.submitted[-1].sampling.logprobs == 2


async def test_sampling_fields_reach_the_scheduler(stack):
    await client(stack).completions.create(
        model="tiny",
        prompt="x",
        max_tokens=3,
        temperature=0.7,
        top_p=0.9,
        seed=42,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
    )
    sampling = stack.backend.submitted[-1].sampling
    assert (sampling.temperature, sampling.top_p, sampling.seed) == (0.7, 0.9, 42)
    assert (sampling.presence_penalty, sampling.frequency_penalty) == (0.5, -0.5)
    assert sampling.max_tokens == 3


async def test_top_p_zero_is_accepted_as_openai_accepts_it(stack, tiny_tokenizer):
    """OpenAI's range is [0, 1]; 0 keeps only the most probable token (the sampler's rule)."""
    reply = await client(stack).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], top_p=0, max_tokens=3
    )
    assert reply.choices[0].message.content == expected_text(stack, tiny_tokenizer, 3)
    assert stack.backend.submitted[-1].sampling.top_p == 0.0


async def test_vllm_extensions_top_k_and_ignore_eos_reach_the_scheduler(stack):
    await client(stack).completions.create(
        model="tiny", prompt="x", max_tokens=3, extra_body={"top_k": 5, "ignore_eos": True}
    )
    sampling = stack.backend.submitted[-1].sampling
    assert sampling.top_k == 5
    assert sampling.ignore_eos is True
    assert sampling.stop_token_ids == []  # EOS no longer ends the request


async def test_request_is_recorded_in_redis_with_a_ttl_and_final_state(stack):
    await client(stack).completions.create(model="tiny", prompt="x", max_tokens=3)
    await stack.settle()
    rid = stack.backend.submitted[-1].request_id
    key = stack.gateway.keys.request(rid)
    record = await stack.redis.hgetall(key)
    assert record[b"state"] == b"finished" and record[b"finish_reason"] == b"length"
    assert record[b"output_len"] == b"3" and record[b"model"] == b"tiny"
    assert 0 < await stack.redis.ttl(key) <= 3600


def aborted(model: str) -> float:
    labels = {"model_name": model, "finished_reason": "abort"}
    return REGISTRY.get_sample_value("aegaeon:request_success_total", labels) or 0.0


async def test_client_disconnect_mid_stream_sends_cancel(stack):
    stack.backend.script = Script(step_s=0.05)
    aborted_before = aborted("tiny")
    async with httpx.AsyncClient(base_url=stack.base_url) as http:
        body = {"model": "tiny", "prompt": "x", "max_tokens": 100, "stream": True}
        async with http.stream("POST", "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    break  # one chunk seen: hang up
    rid = stack.backend.submitted[-1].request_id
    assert [c.reason for c in await stack.backend.cancels_of(rid)] == ["abort"]
    await stack.settle()
    record = await stack.redis.hgetall(stack.gateway.keys.request(rid))
    assert record[b"state"] == b"cancelled"
    assert aborted("tiny") == aborted_before + 1  # finished, reason abort, as vLLM counts it


async def test_client_disconnect_while_queued_sends_cancel(stack):
    stack.backend.script = Script(hang=True)
    async with httpx.AsyncClient(base_url=stack.base_url) as http:
        body = {"model": "tiny", "prompt": "x", "max_tokens": 5}
        with pytest.raises(httpx.ReadTimeout):
            await http.post("/v1/completions", json=body, timeout=0.5)
    rid = stack.backend.submitted[-1].request_id
    assert await stack.backend.cancels_of(rid)
    await stack.settle()


async def test_engine_error_mid_stream_becomes_an_error_chunk_then_done(stack):
    stack.backend.script = Script(error_after=3)
    async with httpx.AsyncClient(base_url=stack.base_url) as http:
        body = {"model": "tiny", "prompt": "x", "max_tokens": 50, "stream": True}
        response = await http.post("/v1/completions", json=body)
    events = [line for line in response.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    assert '"error"' in events[-2] and "worker lost its device" in events[-2]


async def test_cold_model_request_waits_and_is_served(stack, tiny_tokenizer):
    stack.backend.script = Script(step_s=0.2, tokens_per_step=3)  # a slow first step: "loading"
    reply = await client(stack).completions.create(model="cold-one", prompt="x", max_tokens=6)
    assert reply.choices[0].text == expected_text(stack, tiny_tokenizer, 6)
    assert stack.backend.submitted[-1].model == "cold-one"


async def test_engine_error_without_stream_is_an_openai_error(stack):
    stack.backend.script = Script(error_after=2)
    async with httpx.AsyncClient(base_url=stack.base_url) as http:
        response = await http.post(
            "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 50}
        )
    assert response.status_code == 500
    assert "worker lost its device" in response.json()["error"]["message"]
    await stack.settle()
    rid = stack.backend.submitted[-1].request_id
    record = await stack.redis.hgetall(stack.gateway.keys.request(rid))
    assert record[b"state"] == b"error"


async def test_scheduler_rejection_is_passed_on_with_retry_after(stack):
    stack.backend.script = Script(
        reject=SubmitReply(accepted=False, reason="queue full", status=503, retry_after=2.5)
    )
    async with httpx.AsyncClient(base_url=stack.base_url) as http:
        response = await http.post(
            "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 5}
        )
    assert response.status_code == 503
    assert response.headers["retry-after"] == "3"
    assert response.json()["error"]["message"] == "queue full"
    await stack.settle()
    assert await stack.request_keys() == []


async def test_concurrent_streams_each_get_their_own_tokens(stack, tiny_tokenizer):
    api = client(stack)

    async def one(n: int) -> str:
        stream = await api.completions.create(model="tiny", prompt="x", max_tokens=n, stream=True)
        return "".join([c.choices[0].text async for c in stream])

    sizes = [3, 9, 15, 21, 27, 33]
    texts = await asyncio.gather(*(one(n) for n in sizes))
    for n, text in zip(sizes, texts, strict=True):
        assert text == expected_text(stack, tiny_tokenizer, n)


async def test_a_bug_while_streaming_ends_the_stream_with_an_error_chunk(stack, monkeypatch):
    from aegaeon.gateway.responses import ResponseBuilder

    def broken(self, piece):
        raise RuntimeError("formatting bug")

    monkeypatch.setattr(ResponseBuilder, "chunk", broken)
    async with httpx.AsyncClient(base_url=stack.base_url) as http:
        body = {"model": "tiny", "prompt": "x", "max_tokens": 50, "stream": True}
        response = await http.post("/v1/completions", json=body)
    events = [line for line in response.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    assert '"server_error"' in events[-2] and "formatting bug" not in response.text
    await stack.settle()
    rid = stack.backend.submitted[-1].request_id
    assert await stack.backend.cancels_of(rid)


async def test_logit_bias_reaches_the_engine_as_token_ids(stack):
    await client(stack).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2,
        logit_bias={"5": -100, "17": 2.5},
    )  # fmt: skip
    assert stack.backend.submitted[-1].sampling.logit_bias == {5: -100.0, 17: 2.5}
