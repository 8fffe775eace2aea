"""Pydantic models of the OpenAI HTTP API: the HTTP edge only (the wire uses msgspec).

Requests are strict (``"1"`` is not a number, ``1`` is not a bool), as OpenAI's API is; unknown
fields are ignored so clients written for other servers still work. Ranges follow OpenAI's
documented bounds (``n`` at most MAX_CHOICES); what this server does not support is limited in
the schema (``best_of``, content parts other than text) or refused with 400 by the route
(non-empty ``tools`` and ``functions``, a ``tool_choice`` or ``function_call`` that asks for a
call, ``echo``, ``suffix``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from aegaeon.priority import Priority
from aegaeon.serving import MAX_KEEP_ALIVE_S, MAX_PIN

MAX_TOKENS_LIMIT = 1 << 20
MAX_CHOICES = 16
"""The most choices (``n``) one request may ask for: each is a request of its own to the
scheduler (its own prefill and KV), so ``n`` multiplies the work of one HTTP request."""


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Request):
    """``stream_options``: ``include_usage`` adds a last chunk with usage and no choices."""

    include_usage: bool = False


class TextPart(_Request):
    """One part of a message's content; only text is supported."""

    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    """One message of a conversation."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _only_text_parts(cls, content: Any) -> Any:
        """A part of another type (an image, audio, a file) is told so plainly, instead of the
        union's report that the content is not a string."""
        for index, part in enumerate(content if isinstance(content, list) else []):
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind != "text":
                raise PydanticCustomError(
                    "unsupported_content",
                    "Only text content parts are supported (part {index} has type {kind}).",
                    {"index": index, "kind": repr(kind)},
                )
        return content

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class _Sampling(_Request):
    """Fields both endpoints share."""

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    # As OpenAI: [0, 1]; the most probable token is always kept, so 0 keeps only it.
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    n: int | None = Field(
        default=None, ge=1, le=MAX_CHOICES,
        description="Choices to generate for the prompt; with a seed, choice i samples with seed + i.",
    )  # fmt: skip
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(default=None)
    seed: int | None = Field(default=None, ge=-(1 << 63), le=(1 << 64) - 1)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # Extensions that vLLM also accepts (the openai client sends them through ``extra_body``).
    top_k: int | None = Field(default=None, ge=0, le=1 << 20)
    ignore_eos: bool | None = None

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    functions: list[dict[str, Any]] | None = None  # the legacy form of tools
    function_call: Any = None  # the legacy form of tool_choice
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: ``prompt`` is text or token ids, or a batch of either (the
    choices are then ``n`` per prompt, prompt by prompt)."""

    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1, le=1, description="Only 1 is supported.")


# ---------------------------------------------------------------- responses (for the schema)


class ErrorBody(BaseModel):
    """The fields of an OpenAI error."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error: ``{"error": {...}}``."""

    error: ErrorBody


class Usage(BaseModel):
    """Token counts of a request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    """The generated message."""

    role: Literal["assistant"]
    content: str | None = None


class ChatChoice(BaseModel):
    """One choice of a chat completion."""

    index: int
    message: AssistantMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None


class ChatCompletion(BaseModel):
    """A non-streamed chat completion (a stream sends ``chat.completion.chunk`` objects)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    """One choice of a text completion."""

    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None


class Completion(BaseModel):
    """A non-streamed text completion."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    """One registered model. ``state``: its lifecycle state (only ``ready`` takes requests;
    ``state_reason`` says why it ``failed``); ``residency`` is ``resident`` on the workers
    ``resident_on`` lists, or ``cold``; ``cached_on``: the model-store whose host cache holds its
    weights (the store that answered); ``queued``: its requests waiting for a first token,
    ``running``: decoding (the scheduler's last state; 0 when it is not known); ``priority``:
    its class against other models' work, which the scheduler's policies weigh; ``pin``: the
    worker instances that keep it resident (0: not pinned); ``keep_alive_s``: the idle time after
    which it is evicted from the workers and host caches (0: never)."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    state: Literal["loading", "ready", "draining", "failed"]
    state_reason: str | None
    residency: Literal["resident", "cold"]
    resident_on: list[str]
    cached: bool
    cached_on: list[str]
    context_length: int
    dtype: str
    queued: int
    running: int
    priority: Priority
    pin: int
    keep_alive_s: float


class DeployModelRequest(_Request):
    """``POST /v1/aegaeon/models``: register a model folder or ``.gguf`` file (a path on the
    model-store's node) under ``name`` (default: the folder's or file's name), in priority class
    ``priority``, pinned on ``pin`` worker instances (0: not pinned)."""

    path: str = Field(min_length=1, max_length=4096)
    name: str | None = Field(default=None, min_length=1, max_length=64)
    priority: Priority = "normal"
    pin: int = Field(default=0, ge=0, le=MAX_PIN)


class SetPriorityRequest(_Request):
    """``POST /v1/aegaeon/models/{name}/priority``: the model's class against other models'
    work (``low``, ``normal``, ``high``)."""

    priority: Priority


class PinRequest(_Request):
    """``POST /v1/aegaeon/models/{name}/pin``: how many worker instances keep the model resident
    (the aegaeon policy pins it on that many; 0 unpins it)."""

    instances: int = Field(ge=0, le=MAX_PIN)


class KeepAliveRequest(_Request):
    """``POST /v1/aegaeon/models/{name}/keep_alive``: how long the model may sit idle (nothing
    of it queued or running) before it leaves the workers' weight slots and the host caches;
    0 keeps it until another model needs the room."""

    seconds: float = Field(ge=0, le=MAX_KEEP_ALIVE_S)


class DeletedModel(BaseModel):
    """``DELETE /v1/aegaeon/models/{name}`` (as OpenAI's model deletion answers); ``note``: what
    became of its folder in the models directory."""

    id: str
    object: Literal["model"]
    deleted: bool
    note: str


class TokenizeRequest(_Request):
    """``POST /tokenize`` (as vLLM's): a completion ``prompt`` or a chat's ``messages``."""

    model: str = Field(min_length=1, max_length=256)
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1, max_length=4096)
    add_special_tokens: bool = True  # a prompt's BOS and friends (a chat's come from its template)


class TokenizeResponse(BaseModel):
    """The prompt's token ids, their count and the model's context length."""

    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(_Request):
    """``POST /detokenize``: token ids back to text."""

    model: str = Field(min_length=1, max_length=256)
    tokens: list[int] = Field(max_length=MAX_TOKENS_LIMIT)


class DetokenizeResponse(BaseModel):
    """The text of the tokens (special tokens left out, as in completions)."""

    prompt: str


class ModelsResponse(BaseModel):
    """``GET /v1/models``."""

    object: Literal["list"]
    data: list[ModelCard]


class HealthResponse(BaseModel):
    """``GET /health``: ``ok`` and what is missing when not."""

    status: Literal["ok", "unavailable"]
    nats: bool
    redis: bool
    registry: bool  # the model-store's registry answered at least once
    scheduler: bool
    workers: int
    missing: list[str]
