"""``n`` choices of one completion (per prompt, for a batch of prompts): each a request of its
own to the scheduler under the one response id, answered together (streamed under each choice's index, or as one body), with usage
summed, and every choice cancelled when the client goes or one of them fails."""

from __future__ import annotations

from types import SimpleNamespace

import httpx
import pytest
from aegaeon.gateway.choices import Choices
from aegaeon.gateway.observe import RequestObserver
from openai import AsyncOpenAI, BadRequestError
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY

from .conftest import serve_stack
from .fake_backend import Script
from .test_openai_client import client, expected_text

pytestmark = pytest.mark.timeout(60)

MESSAGES = [{"role": "user", "content": "hi"}]


async def test_chat_choices_are_requests_of_their_own_under_one_response(stack, tiny_tokenizer):
    reply = await client(stack).chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=7, n=3, seed=5, temperature=0.7
    )
    assert [c.index for c in reply.choices] == [0, 1, 2]
    for choice in reply.choices:
        assert choice.message.content == expected_text(stack, tiny_tokenizer, 7)
        assert choice.finish_reason == "length"
    submitted = stack.backend.submitted[-3:]
    assert [s.request_id for s in submitted] == [f"{reply.id}-{i}" for i in range(3)]
    assert [s.sampling.seed for s in submitted] == [5, 6, 7]  # as vLLM seeds its choices
    assert {s.sampling.temperature for s in submitted} == {0.7}
    # The prompt counts once, as OpenAI counts it; the outputs of every choice.
    assert reply.usage.prompt_tokens == len(submitted[0].prompt_token_ids)
    assert reply.usage.completion_tokens == 3 * 7
    await stack.settle()  # every choice gave its admission slot back


async def test_streamed_choices_come_under_their_index_with_usage_of_all(stack, tiny_tokenizer):
    stream = await client(stack).completions.create(
        model="tiny", prompt="The quick brown", max_tokens=12, n=2, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = [chunk async for chunk in stream]
    assert len({c.id for c in chunks}) == 1
    texts, finishes = {0: "", 1: ""}, {}
    for chunk in chunks[:-1]:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert texts == {i: expected_text(stack, tiny_tokenizer, 12) for i in (0, 1)}
    assert finishes == {0: "length", 1: "length"}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 2 * 12
    assert [s.sampling.seed for s in stack.backend.submitted[-2:]] == [None, None]


async def test_a_chat_stream_opens_every_choice_with_its_role(stack):
    stream = await client(stack).chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=3, n=2, stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert [(c.choices[0].index, c.choices[0].delta.role) for c in chunks[:2]] == [
        (0, "assistant"),
        (1, "assistant"),
    ]
    ends = sorted(c.choices[0].index for c in chunks if c.choices[0].finish_reason)
    assert ends == [0, 1]


async def test_a_batch_of_prompts_gets_n_choices_each_prompt_by_prompt(stack, tiny_tokenizer):
    prompts = ["The quick brown", "fox"]
    reply = await client(stack).completions.create(
        model="tiny", prompt=prompts, max_tokens=5, n=2, seed=3
    )
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert {c.text for c in reply.choices} == {expected_text(stack, tiny_tokenizer, 5)}
    submitted = stack.backend.submitted[-4:]
    assert [s.request_id for s in submitted] == [f"{reply.id}-{i}" for i in range(4)]
    ids = [tiny_tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    assert [s.prompt_token_ids for s in submitted] == [ids[0], ids[0], ids[1], ids[1]]
    assert [s.sampling.seed for s in submitted] == [3, 4, 3, 4]  # per prompt, as vLLM
    assert reply.usage.prompt_tokens == len(ids[0]) + len(ids[1])  # each prompt once
    assert reply.usage.completion_tokens == 4 * 5
    tokens = await client(stack).completions.create(model="tiny", prompt=ids, max_tokens=5)
    assert [s.prompt_token_ids for s in stack.backend.submitted[-2:]] == ids
    assert [c.index for c in tokens.choices] == [0, 1]
    await stack.settle()


async def test_a_client_gone_cancels_every_choice(stack):
    # Slow steps: the choices must still be running (about 6 s of text) when the client goes,
    # however busy the host, or they would finish instead of being cancelled.
    stack.backend.script = Script(step_s=0.2)
    async with httpx.AsyncClient(base_url=stack.base_url) as http:
        body = {"model": "tiny", "prompt": "x", "max_tokens": 100, "n": 3, "stream": True}
        async with http.stream("POST", "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if '"text":"' in line and '"text":""' not in line:
                    break  # a token seen: hang up
    for submitted in stack.backend.submitted[-3:]:
        cancels = await stack.backend.cancels_of(submitted.request_id)
        assert [c.reason for c in cancels] == ["abort"]
    await stack.settle()


async def test_one_failing_choice_ends_the_answer_and_cancels_the_others(stack):
    stack.backend.script = Script(step_s=0.2, error_after=2, error_suffix="-1")  # as above
    async with httpx.AsyncClient(base_url=stack.base_url) as http:
        body = {"model": "tiny", "prompt": "x", "max_tokens": 100, "n": 3, "stream": True}
        response = await http.post("/v1/completions", json=body)
    events = [line for line in response.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    assert "worker lost its device" in events[-2]
    first, failed, last = stack.backend.submitted[-3:]
    assert failed.request_id.endswith("-1")
    for other in (first, last):
        assert [c.reason for c in await stack.backend.cancels_of(other.request_id)] == ["abort"]
    await stack.settle()


async def test_more_choices_than_the_gateway_runs_at_once_are_a_400(
    nats_server, redis_server, tiny_model, tiny_tokenizer
):
    async for stack in serve_stack(
        nats_server, redis_server, tiny_model, "choices", max_in_flight=2
    ):
        api = AsyncOpenAI(base_url=stack.base_url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(BadRequestError) as refused:  # a 503 for ever would hide the cause
            await api.completions.create(model="tiny", prompt="x", max_tokens=3, n=3)
        assert "n = 3" in str(refused.value)
        reply = await api.completions.create(model="tiny", prompt="x", max_tokens=3, n=2)
        assert [c.text for c in reply.choices] == [expected_text(stack, tiny_tokenizer, 3)] * 2
        await stack.settle()


def finished(model: str, reason: str) -> float:
    labels = {"model_name": model, "finished_reason": reason}
    return REGISTRY.get_sample_value("aegaeon:request_success_total", labels) or 0.0


def ended_choice(choice: int, reason: str, tokens: int) -> SimpleNamespace:
    """What the observer reads of a closed Generation."""
    prepared = SimpleNamespace(choice=choice, prompt_index=0, response_id="cmpl-x", prompt_ids=[1, 2, 3],
                               model=SimpleNamespace(name="observed-model"), stream=False)  # fmt: skip
    timings = SimpleNamespace(output_tokens=tokens, first_token=None, token_times=[])
    return SimpleNamespace(p=prepared, timings=timings, outcome=reason, observer=None)


def test_the_span_ends_with_the_last_choice_and_each_choice_counts_as_a_request():
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    observer = RequestObserver(provider.get_tracer("test").start_span("text_completion m"), None)
    first, second = ended_choice(0, "length", 4), ended_choice(1, "stop", 2)
    before = finished("observed-model", "length"), finished("observed-model", "stop")
    observer.watch(Choices([first, second]))  # type: ignore[list-item]
    observer.finished(second)  # type: ignore[arg-type]
    assert not spans.get_finished_spans()  # choice 0 still runs
    observer.finished(first)  # type: ignore[arg-type]
    observer.finished(first)  # type: ignore[arg-type]  # a second close counts nothing
    (span,) = spans.get_finished_spans()
    assert span.attributes is not None
    assert span.attributes["gen_ai.usage.output_tokens"] == 6
    assert span.attributes["gen_ai.usage.input_tokens"] == 3  # the prompt once
    assert list(span.attributes["gen_ai.response.finish_reasons"]) == ["length", "stop"]
    after = finished("observed-model", "length"), finished("observed-model", "stop")
    assert after == (before[0] + 1, before[1] + 1)
