"""Logprobs through the official openai client: each token keeps its own logprob (also after
tokens were refilled from Redis), the list ends where the text ends (stop string, EOS), and each
token is named by its true bytes."""

from __future__ import annotations

import pytest
from aegaeon.gateway.tokenization import load_tokenizer
from openai import AsyncOpenAI

from .fake_backend import Script
from .tokenizer_factory import write_sentencepiece_model

pytestmark = pytest.mark.timeout(60)

TEXT = Script().text
MESSAGES = [{"role": "user", "content": "x"}]


def client(stack) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=stack.base_url + "/v1", api_key="unused", max_retries=0)


def spelled(content) -> bytes:
    return b"".join(bytes(entry.bytes) for entry in content)


async def test_tokens_refilled_after_a_lost_step_keep_every_other_logprob_in_place(
    stack, tiny_model, tiny_tokenizer
):
    """Step 3's batch is lost in transit and refilled from Redis without logprobs: that token
    gets a null logprob, and every later token still carries its own (the fake backend's top
    alternatives start with the token itself)."""
    stack.backend.script = Script(lost_steps={3})
    ids = stack.backend.expected_ids(10)
    chat = await client(stack).chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=10,
        logprobs=True,
        top_logprobs=2,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 10
    assert content[3].logprob is None and content[3].top_logprobs == []
    tok = load_tokenizer(tiny_model)
    assert [e.token for e in content] == [tok.token_text(t) for t in ids]
    for entry in content[:3] + content[4:]:
        assert entry.logprob == -0.5 and entry.top_logprobs[0].token == entry.token
    completion = await client(stack).completions.create(
        model="tiny", prompt="x", max_tokens=10, logprobs=1
    )
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == 10 == len(logprobs.text_offset)
    assert logprobs.token_logprobs[3] is None and logprobs.top_logprobs[3] is None
    assert logprobs.token_logprobs[:3] + logprobs.token_logprobs[4:] == [-0.5] * 9
    assert all(next(iter(top)) == token for token, top in
               zip(logprobs.tokens[4:], logprobs.top_logprobs[4:], strict=True))  # fmt: skip
    assert tiny_tokenizer.decode(ids) == completion.choices[0].text


@pytest.mark.parametrize("stream", [False, True])
async def test_logprobs_end_at_the_token_where_a_stop_string_cuts_the_text(stack, stream):
    """ "P here" begins inside the token "OP": "OP" brings the text's last "O" and stays; the
    tokens after it (the rest of the stop string, and what the worker made in the same step)
    are not output. The engine made them all: usage counts them."""
    stack.backend.script = Script(tokens_per_step=1 if stream else 4)
    api = client(stack)
    asked = {"model": "tiny", "messages": MESSAGES, "stop": "P here", "logprobs": True}
    if stream:
        chunks = [c async for c in await api.chat.completions.create(**asked, stream=True)]
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        content = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]  # fmt: skip
    else:
        reply = await api.chat.completions.create(**asked)
        text, content = reply.choices[0].message.content, reply.choices[0].logprobs.content
    assert text == TEXT[: TEXT.index("P here")]
    assert content[-1].token == "OP" and spelled(content) == text.encode() + b"P"
    if not stream:
        assert reply.usage.completion_tokens % 4 == 0  # whole steps, past the cut
        assert reply.usage.completion_tokens >= len(content) + 3


@pytest.mark.parametrize("stream", [False, True])
async def test_the_eos_token_ends_the_logprobs_but_counts_in_usage(stack, stream):
    api = client(stack)
    asked = {"model": "tiny", "messages": MESSAGES, "logprobs": True, "top_logprobs": 1}
    generated = len(stack.backend.expected_ids(10**6)) + 1  # the text's tokens, then EOS
    if stream:
        chunks = [c async for c in await api.chat.completions.create(
            **asked, stream=True, stream_options={"include_usage": True})]  # fmt: skip
        content = [e for c in chunks if c.choices and c.choices[0].logprobs
                   for e in c.choices[0].logprobs.content]  # fmt: skip
        usage = chunks[-1].usage
    else:
        reply = await api.chat.completions.create(**asked)
        content, usage = reply.choices[0].logprobs.content, reply.usage
    assert "<|eos|>" not in [e.token for e in content]
    assert spelled(content) == TEXT.encode() and len(content) == generated - 1
    assert usage.completion_tokens == generated


async def test_logprob_bytes_are_each_tokens_own_bytes_and_partial_ones_are_named_bytes(stack):
    """The tiny byte-level tokenizer splits "ö", "日本語" and "🙂" across tokens."""
    reply = await client(stack).chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        logprobs=True,
        top_logprobs=2,
    )
    content = reply.choices[0].logprobs.content
    assert all("\ufffd" not in e.token for e in content)
    partial = [e for e in content if e.token.startswith("bytes:")]
    assert partial and spelled(content) == TEXT.encode()
    for entry in partial:
        with pytest.raises(UnicodeDecodeError):
            bytes(entry.bytes).decode()
        assert entry.token == "bytes:" + "".join(f"\\x{b:02x}" for b in entry.bytes)
    whole = [e for e in content if not e.token.startswith("bytes:")]
    assert all(e.token.encode() == bytes(e.bytes) for e in whole)
    tops = [t for e in content for t in e.top_logprobs]
    assert all(t.token.encode() == bytes(t.bytes) or t.token.startswith("bytes:") for t in tops)


def test_sentencepiece_tokens_keep_their_space_and_byte_fallback_its_byte(tmp_path):
    tok = load_tokenizer(write_sentencepiece_model(tmp_path / "sp"))
    ids = tok.encode("world wé", special=False)
    pieces = tok.tokenizer.convert_ids_to_tokens(ids)
    assert pieces == ["\u2581world", "\u2581w", "<0xC3>", "<0xA9>"]
    assert [tok.token_text(t) for t in ids] == [" world", " w", "bytes:\\xc3", "bytes:\\xa9"]
    assert b"".join(tok.token_bytes(t) for t in ids) == " world wé".encode()
    assert tok.token_text(tok.eos_token_ids[0]) == "</s>"
