"""From a validated OpenAI request to what the scheduler needs: token ids and SamplingParams.

Everything here is a check or a translation; the only work is tokenization.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Literal

import msgspec

from aegaeon.protocol import ModelInfo, SamplingParams

from .errors import APIError, bad_request
from .openai_types import ChatCompletionRequest, ChatMessage, CompletionRequest, TokenizeRequest
from .tokenization import ModelTokenizer, TemplateRefusal

Kind = Literal["chat", "completion"]

LONG_TEXT = 20_000
"""Prompts longer than this (characters) are tokenized off the event loop."""

TEMPLATE_ROLES = {"developer": "system"}
"""Roles as chat templates know them: OpenAI's ``developer`` is the successor of ``system``, and
templates written before it (Qwen2.5's, Llama's) drop or mis-render a role they do not know."""

NO_CALL = (None, "none", "auto")
"""``tool_choice`` / ``function_call`` values that ask for no call: with no tools (non-empty
``tools`` and ``functions`` are refused), ``auto`` can only choose none."""


@dataclass
class Prepared:
    """An accepted-looking request, tokenized, ready to submit: one choice of a completion
    (``request_id`` is the scheduler's for this choice, ``response_id`` the client's for the
    whole completion; the same with one choice)."""

    kind: Kind
    request_id: str
    model: ModelInfo
    tokenizer: ModelTokenizer
    prompt_ids: list[int]
    sampling: SamplingParams
    stops: list[str]
    stream: bool
    include_usage: bool
    top_logprobs: int | None  # None: no logprobs asked
    created: int = field(default_factory=lambda: int(time.time()))
    choice: int = 0  # this choice's index among the completion's (prompts × n)
    prompt_index: int = 0  # which prompt of a completion's batch
    response_id: str = ""  # "": the request id

    def __post_init__(self) -> None:
        self.response_id = self.response_id or self.request_id


def choices(prepared: list[Prepared], n: int) -> list[Prepared]:
    """The choices of a completion, ``n`` per prompt (``prepared``: one per prompt, sharing
    the request id), each a request of its own to the scheduler: choice ``i·n + j`` is the
    j-th of prompt i, with id ``<id>-<i·n + j>`` under the one response id (the id itself with
    a single choice), and with a seed it samples with seed + j (as vLLM seeds them), so that a
    prompt's choices differ and a run repeats."""
    if len(prepared) == 1 and n == 1:
        return list(prepared)

    def choice(prompt: Prepared, j: int) -> Prepared:
        index = prompt.prompt_index * n + j
        seed = prompt.sampling.seed
        sampling = prompt.sampling
        if seed is not None:
            sampling = msgspec.structs.replace(sampling, seed=(seed + j) % (1 << 63))
        return replace(prompt, request_id=f"{prompt.request_id}-{index}", choice=index,
                       response_id=prompt.request_id, sampling=sampling)  # fmt: skip

    return [choice(prompt, j) for prompt in prepared for j in range(n)]


def check_supported(body: ChatCompletionRequest | CompletionRequest) -> None:
    """Refuse parameters this server accepts in the schema but cannot honour."""
    if isinstance(body, ChatCompletionRequest):
        if body.tools:
            raise bad_request("tools are not supported.", param="tools")
        if body.functions:
            raise bad_request("functions are not supported.", param="functions")
        if body.tool_choice not in NO_CALL:
            raise bad_request("tool_choice is not supported.", param="tool_choice")
        if body.function_call not in NO_CALL:
            raise bad_request("function_call is not supported.", param="function_call")
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise bad_request("Only response_format type 'text' is supported.", "response_format")
    else:
        if body.echo:
            raise bad_request("echo is not supported.", param="echo")
        if body.suffix:
            raise bad_request("suffix is not supported.", param="suffix")
    stops = body.stop_strings()
    if len(stops) > 16 or any(len(s) > 1024 for s in stops):
        raise bad_request("At most 16 stop strings of up to 1024 characters.", param="stop")


def check_consistent(body: ChatCompletionRequest | CompletionRequest) -> None:
    """Refuse a field that means something only beside another the request leaves out, as
    OpenAI does: ignoring it would hide the client's mistake."""
    chat = body if isinstance(body, ChatCompletionRequest) else None
    if chat is not None and chat.top_logprobs is not None and not chat.logprobs:
        raise bad_request(
            "'logprobs' must be set to true if 'top_logprobs' is used.", param="top_logprobs"
        )
    if body.stream_options is not None and not body.stream:
        raise bad_request(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            param="stream_options",
        )


def prompt_count(body: ChatCompletionRequest | CompletionRequest) -> int:
    """How many prompts the request holds (known before tokenizing): a chat one, a completion
    one or a batch (a list of texts or of token-id lists)."""
    batch = _batch(body)
    return 1 if batch is None else len(batch)


def _batch(body: ChatCompletionRequest | CompletionRequest) -> list[str] | list[list[int]] | None:
    """A completion's batch of prompts (None: one prompt, text or token ids)."""
    if isinstance(body, ChatCompletionRequest):
        return None
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        return prompt  # type: ignore[return-value]
    return None


async def prompts(
    body: ChatCompletionRequest | CompletionRequest, tok: ModelTokenizer
) -> list[list[int]]:
    """Each prompt as token ids: a chat through the template, a completion's text or ids, or
    each of a completion's batch of them."""
    if isinstance(body, ChatCompletionRequest):
        return [await chat_ids(body.messages, tok)]
    batch = _batch(body)
    if batch is not None:
        return [await _completion_ids(p, tok) for p in batch]
    return [await _completion_ids(body.prompt, tok)]  # type: ignore[arg-type]


async def _completion_ids(prompt: str | list[int], tok: ModelTokenizer) -> list[int]:
    if isinstance(prompt, str):
        ids = await _maybe_thread(len(prompt), tok.encode, prompt)
        if not ids:
            raise bad_request("The prompt is empty.", param="prompt")
        return ids
    if not prompt:
        raise bad_request("The prompt is empty.", param="prompt")
    ids = [int(t) for t in prompt]
    if any(t < 0 or t >= tok.vocab_size for t in ids):
        raise bad_request(f"Token ids must be in [0, {tok.vocab_size}).", param="prompt")
    return ids


async def tokenize(body: TokenizeRequest, tok: ModelTokenizer) -> list[int]:
    """``/tokenize``: exactly what a completion (``prompt``) or a chat (``messages``, through
    the template, ready for the assistant's turn) would be given as its prompt."""
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("Give either prompt or messages.", param="prompt")
    if body.messages is not None:
        return await chat_ids(body.messages, tok)
    text = body.prompt or ""
    return await _maybe_thread(len(text), lambda t: tok.encode(t, body.add_special_tokens), text)


async def chat_ids(messages: list[ChatMessage], tok: ModelTokenizer) -> list[int]:
    """A conversation through the model's chat template; one the template refuses is a 400
    with the template's words (the client can change the conversation, a retry cannot)."""
    rendered = [{"role": TEMPLATE_ROLES.get(m.role, m.role), "content": m.text()} for m in messages]
    try:
        return await _maybe_thread(sum(len(m["content"]) for m in rendered), tok.encode_chat, rendered)  # fmt: skip
    except TemplateRefusal as exc:
        raise bad_request(
            f"The model's chat template refused the messages: {exc}", param="messages"
        ) from None


async def _maybe_thread(size: int, fn, arg):
    if size > LONG_TEXT:
        return await asyncio.to_thread(fn, arg)
    return fn(arg)


def max_new_tokens(
    body: ChatCompletionRequest | CompletionRequest, prompt_len: int, context: int
) -> int:
    """The output budget; a prompt that leaves no room, or a budget past the context, is a 400."""
    room = context - prompt_len
    if room <= 0:
        raise APIError(
            400,
            f"This model's maximum context length is {context} tokens. However, your prompt "
            f"has {prompt_len} tokens.",
            code="context_length_exceeded",
            param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
        )
    asked = body.max_tokens
    if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None:
        asked = body.max_completion_tokens
    if asked is None:
        # OpenAI's defaults: completions 16 tokens, chat as long as the context allows.
        return min(16, room) if isinstance(body, CompletionRequest) else room
    if asked > room:
        raise APIError(
            400,
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt_len + asked} tokens ({prompt_len} in the prompt, {asked} for the output).",
            code="context_length_exceeded",
            param="max_tokens",
        )
    return asked


def sampling_params(
    body: ChatCompletionRequest | CompletionRequest, max_tokens: int, tok: ModelTokenizer
) -> SamplingParams:
    """OpenAI sampling fields → the engine's SamplingParams (temperature 0 is greedy); a field
    the request leaves out takes the model's generation_config.json value, else OpenAI's."""
    model = tok.sampling_defaults
    # The engine stops at the model's own EOS unless told otherwise; the tokenizer's EOS ids
    # are added here because a chat template may end turns with another token. A stop string
    # that spells one token (``<|im_end|>``) stops at that token too: special tokens are not
    # in the decoded text, so the string alone would never match. It stays a stop string as
    # well, for the same characters generated as ordinary tokens.
    eos = [] if body.ignore_eos else list(tok.eos_token_ids)
    stop_ids = list(dict.fromkeys([*eos, *tok.spelled_token_ids(body.stop_strings())]))
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=model.get("temperature", 1.0) if body.temperature is None else body.temperature,
        top_p=model.get("top_p", 1.0) if body.top_p is None else body.top_p,
        seed=None if body.seed is None else body.seed % (1 << 63),
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        top_k=int(model.get("top_k", 0)) if body.top_k is None else body.top_k,
        stop_token_ids=stop_ids,
        ignore_eos=bool(body.ignore_eos),
        logprobs=top_logprobs(body),
        logit_bias=logit_bias(body, tok.vocab_size),
    )


MAX_LOGIT_BIAS = 1024
"""The most tokens one request may bias (each costs the sampler a little on every step)."""


def logit_bias(body: ChatCompletionRequest | CompletionRequest, vocab_size: int) -> dict[int, float]:  # fmt: skip
    """OpenAI's ``logit_bias`` (token ids as strings → a bias in [-100, 100]) as the engine's
    map; a key that is not a token id of this model, or a bias out of range, is a 400."""
    given = body.logit_bias or {}
    if len(given) > MAX_LOGIT_BIAS:
        raise bad_request(f"logit_bias may list at most {MAX_LOGIT_BIAS} tokens.", "logit_bias")
    out: dict[int, float] = {}
    for key, bias in given.items():
        token = int(key) if key.isascii() and key.isdigit() else -1
        if not 0 <= token < vocab_size:
            raise bad_request(
                f"logit_bias keys must be token ids in [0, {vocab_size}); got {key!r}.",
                param="logit_bias",
            )
        if not -100.0 <= bias <= 100.0:
            raise bad_request(
                f"logit_bias values must be in [-100, 100]; got {bias:g} for {key!r}.",
                param="logit_bias",
            )
        out[token] = float(bias)
    return out


def top_logprobs(body: ChatCompletionRequest | CompletionRequest) -> int | None:
    if isinstance(body, ChatCompletionRequest):
        return (body.top_logprobs or 0) if body.logprobs else None
    return body.logprobs


def new_request_id(kind: Kind) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
