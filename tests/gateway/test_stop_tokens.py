"""A stop string that spells one of the tokenizer's added tokens (ChatML's ``<|im_end|>``) stops
generation where that token is generated: the text skips special tokens, so the string alone
would never match. The engine is told the token's id; the output ends before it, finish_reason
"stop", and logprobs and usage follow the EOS rules (output_text.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from aegaeon.gateway.openai_types import ChatCompletionRequest
from aegaeon.gateway.output_text import OutputText
from aegaeon.gateway.prepare import sampling_params
from aegaeon.gateway.tokenization import load_tokenizer
from openai import AsyncOpenAI

from .conftest import serve_stack
from .fake_backend import Script
from .tokenizer_factory import with_added_tokens

pytestmark = pytest.mark.timeout(60)

SPECIAL = ["<|im_start|>", "<|im_end|>"]
PLAIN = ["[[END]]"]
SCRIPT = "Hello there<|im_end|> and what comes after"
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def chatml_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return with_added_tokens(tiny_model, tmp_path_factory.mktemp("chatml") / "m", SPECIAL, PLAIN)


@pytest.fixture
def chatml_tokenizer(chatml_model: Path):
    return load_tokenizer(chatml_model)


@pytest.fixture
async def chatml_stack(nats_server, redis_server, chatml_model):
    async for stack in serve_stack(nats_server, redis_server, chatml_model, "chatml"):
        stack.backend.script = Script(text=SCRIPT)
        yield stack


def client(stack) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=stack.base_url + "/v1", api_key="unused", max_retries=0)


def test_a_stop_string_that_is_exactly_an_added_token_becomes_its_stop_token_id(
    chatml_tokenizer,
):
    tok = chatml_tokenizer
    added = tok.tokenizer.convert_tokens_to_ids
    stops = ["<|im_end|>", "[[END]]", "<|eos|>", " <|im_end|>", "im_end", "<|im_end|><|im_end|>"]
    body = ChatCompletionRequest(model="m", messages=MESSAGES, stop=stops)
    assert sampling_params(body, 8, tok).stop_token_ids == [
        added("<|eos|>"), added("<|im_end|>"), added("[[END]]")
    ]  # fmt: skip
    # Asked to stop at a token, the engine stops there even when told to ignore EOS.
    body = ChatCompletionRequest(model="m", messages=MESSAGES, stop="<|eos|>", ignore_eos=True)
    assert sampling_params(body, 8, tok).stop_token_ids == [added("<|eos|>")]


def test_a_stop_token_whose_text_shows_is_not_part_of_the_output(chatml_tokenizer):
    """A plain added token is kept by decoding: as a stop token, its text is dropped too."""
    tok = chatml_tokenizer
    end = tok.tokenizer.convert_tokens_to_ids("[[END]]")
    ids = tok.encode("Hello there", special=False)
    output = OutputText(tok.decode, [], [end])
    delta = output.feed([*ids, end], [None] * (len(ids) + 1), "stop")
    assert (delta.text, delta.token_ids) == ("Hello there", ids)


async def test_a_chat_stops_where_the_special_token_its_stop_string_spells_is_generated(
    chatml_stack, chatml_tokenizer
):
    tok = chatml_tokenizer
    im_end = tok.tokenizer.convert_tokens_to_ids("<|im_end|>")
    before = tok.encode("Hello there", special=False)
    reply = await client(chatml_stack).chat.completions.create(
        model="tiny", messages=MESSAGES, stop=["<|im_end|>"], logprobs=True, top_logprobs=1
    )
    choice = reply.choices[0]
    assert (choice.message.content, choice.finish_reason) == ("Hello there", "stop")
    # As with EOS: the stop token counts as generated, and has no logprob in the output.
    assert reply.usage.completion_tokens == len(before) + 1
    assert [e.token for e in choice.logprobs.content] == [tok.token_text(t) for t in before]
    assert im_end in chatml_stack.backend.submitted[-1].sampling.stop_token_ids

    stream = await client(chatml_stack).chat.completions.create(
        model="tiny", messages=MESSAGES, stop="<|im_end|>", stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello there"
    assert chunks[-1].choices[0].finish_reason == "stop"
