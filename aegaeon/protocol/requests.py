"""A request's messages: the gateway's submit and cancel to the scheduler, and the token stream
a worker (or the scheduler, for statuses) sends back to the gateway that holds the client."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import msgspec

FinishReason = Literal["stop", "length", "abort", "error"]
"""Why a request ended. ``abort``: the client went away; ``error``: see the event's message."""


class SamplingParams(msgspec.Struct, omit_defaults=True, frozen=True):
    """How one request picks its next token. temperature 0 means greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; N: the chosen token's logprob and the top N
    logit_bias: dict[int, float] = {}  # token id → added to its logit before the choice


# ---------------------------------------------------------------- gateway ↔ scheduler


class SubmitRequest(msgspec.Struct, omit_defaults=True):
    """gateway → scheduler (request/reply on ``requests.submit``): admit a tokenized request.

    ``output_token_ids`` is non-empty only when a request is re-submitted after a failure:
    the tokens the client has already received, which the engine must not send again.
    """

    request_id: str
    model: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    gateway_id: str
    arrival_time: float
    output_token_ids: list[int] = []
    api_key_id: str | None = None


class SubmitReply(msgspec.Struct, omit_defaults=True):
    """scheduler → gateway: the answer to a SubmitRequest.

    ``status`` is the HTTP status the gateway should give when rejected (404 unknown model,
    413 too long, 503 overloaded with ``retry_after`` seconds).
    """

    accepted: bool
    reason: str = ""
    status: int = 200
    retry_after: float | None = None
    queued_ahead: int = 0  # accepted: requests admitted before it still waiting for a first token


class CancelRequest(msgspec.Struct, omit_defaults=True):
    """gateway → scheduler (``requests.cancel``): the client went away or a stop string hit."""

    request_id: str
    reason: str = "abort"


# ---------------------------------------------------------------- worker → gateway


class RequestStatus(msgspec.Struct, array_like=True, omit_defaults=True):
    """Where a request waiting for its first token is: ``queued`` (``position``: requests
    admitted before it still waiting, from the scheduler) or ``loading`` its model's weights
    (``bytes_done`` of ``bytes_total``, from the worker). Streams show it as SSE comments."""

    state: Literal["queued", "loading"]
    position: int | None = None
    model: str | None = None
    bytes_done: int | None = None
    bytes_total: int | None = None


class TokenEvent(msgspec.Struct, array_like=True, omit_defaults=True):
    """New tokens of one request. ``start`` is the index of the first of them in the output,
    so a gateway can drop a duplicate after a recovery re-run. An event with a ``status`` and
    no tokens says where a request still waiting for its first token is."""

    request_id: str
    start: int
    token_ids: list[int]
    # Per token: [chosen logprob, [[token id, logprob], …top N]]; empty when not asked for.
    logprobs: list[tuple[float, list[tuple[int, float]]]] = []
    finish_reason: FinishReason | None = None
    error: str | None = None
    status: RequestStatus | None = None


class TokenBatch(msgspec.Struct, array_like=True):
    """worker → gateway (``tokens.<gateway-id>``): every owned request's tokens from one step.
    ``sent_at``: the worker's wall clock (``time.time()``) at publish, so a client on the same
    host can measure what the path after the worker adds (``aegaeon bench stack``)."""

    events: list[TokenEvent]
    sent_at: float = 0.0


def status_batches(statuses: Iterable[tuple[str, str, RequestStatus]]) -> dict[str, TokenBatch]:
    """(request id, its gateway id, status) → one TokenBatch of status events per gateway."""
    events: dict[str, list[TokenEvent]] = {}
    for request_id, gateway_id, status in statuses:
        events.setdefault(gateway_id, []).append(TokenEvent(request_id, 0, [], status=status))
    return {gateway_id: TokenBatch(batch) for gateway_id, batch in events.items()}
