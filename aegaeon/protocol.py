"""Every message that crosses a process boundary, defined once.

Payloads are msgpack, encoded from these msgspec Structs (``encode`` / ``decode_*`` below).
Subjects live in :mod:`aegaeon.subjects`. Who sends what to whom::

    gateway ──SubmitRequest (req/reply)──► scheduler ──WorkerCommand──► gpu-worker
       ▲     ──CancelRequest────────────►     ▲                            │
       │                                      └──────WorkerEvent───────────┤
       └──────────────────────TokenBatch (one per engine step)─────────────┘
    gpu-worker ──Heartbeat──► scheduler, gateway, model-store
    anyone ──ModelsQuery (req/reply)──► model-store

Hot-path types are ``array_like`` (no field names on the wire) and ``omit_defaults``.
"""

from __future__ import annotations

from typing import Literal

import msgspec

FinishReason = Literal["stop", "length", "abort", "error"]
"""Why a request ended. ``abort``: the client went away; ``error``: see the event's message."""

WorkerRole = Literal["prefill", "decode", "both"]


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


class CancelRequest(msgspec.Struct, omit_defaults=True):
    """gateway → scheduler (``requests.cancel``): the client went away or a stop string hit."""

    request_id: str
    reason: str = "abort"


# ---------------------------------------------------------------- scheduler → worker


class KVHandle(msgspec.Struct, frozen=True):
    """Where an exported request's KV lies in a host KV pool on this node (prefill → decode).

    The bytes are ``num_blocks`` whole blocks of shape [layers, 2, block_size, kv_heads, head_dim]
    in ``dtype``, holding the KV of the first ``num_tokens`` tokens of prompt + outputs.
    Produced by ``Engine.export_kv``, sent in ``TurnDone.exported``, carried in
    ``AssignRequest.kv``, consumed by ``Engine.import_kv``.
    """

    path: str
    offset: int
    nbytes: int
    num_tokens: int
    num_blocks: int
    block_size: int
    layers: int
    kv_heads: int
    head_dim: int
    dtype: str


class AssignRequest(msgspec.Struct, tag="assign", omit_defaults=True):
    """scheduler → worker: take ownership of a request (it waits for prefill in a turn)."""

    request_id: str
    model: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    gateway_id: str
    arrival_time: float
    output_token_ids: list[int] = []
    # Prefill → decode hand-off on one node: the request's KV lies in ``kv_source``'s host KV pool;
    # the worker copies it into its own pool and decodes without a re-prefill (then reports
    # KVImported, after which the scheduler lets the source free it).
    kv: KVHandle | None = None
    kv_source: str | None = None


class RunTurn(msgspec.Struct, tag="turn", omit_defaults=True):
    """scheduler → worker: make ``model`` resident, then step its requests for ``quota_s``.

    The worker prefills any of ``request_ids`` not yet prefilled, swaps in those whose KV is
    on the host, and decodes until the quota ends, the batch empties, ``max_steps`` is reached
    or a Preempt arrives. With ``swap_out_after`` it moves the batch's KV to the host pool at
    the end so the next model has room. ``prefetch_model`` is staged while the turn runs.
    ``prefill_only``: stop after the prefill step (prefill instances, grouped prefill).
    ``export_kv``: request ids whose KV the worker leaves in its host KV pool after the turn for
    a decode worker on the same node (their handles come back in ``TurnDone.exported``).
    ``drop_kv``: request ids whose KV the worker drops before the turn (they are recomputed,
    prompt and tokens so far, when they next run).
    """

    turn_id: int
    model: str
    request_ids: list[str]
    quota_s: float
    prefetch_model: str | None = None
    swap_out_after: bool = False
    max_steps: int | None = None
    prefill_only: bool = False
    export_kv: list[str] = []
    drop_kv: list[str] = []


class Preempt(msgspec.Struct, tag="preempt", omit_defaults=True):
    """scheduler → worker: end the current turn at the next token boundary."""

    turn_id: int | None = None


class AbortRequest(msgspec.Struct, tag="abort", omit_defaults=True):
    """scheduler → worker: drop a request and free its KV (client cancelled)."""

    request_id: str


class PrefetchModel(msgspec.Struct, tag="prefetch", omit_defaults=True):
    """scheduler → worker: stage this model's weights (host cache → arena) ahead of a switch."""

    model: str


class Drain(msgspec.Struct, tag="drain", omit_defaults=True):
    """scheduler → worker: accept no new work; finish or hand back what you hold, then exit."""


WorkerCommand = AssignRequest | RunTurn | Preempt | AbortRequest | PrefetchModel | Drain


# ---------------------------------------------------------------- worker → scheduler


class TurnDone(msgspec.Struct, tag="turn_done", omit_defaults=True):
    """worker → scheduler: a RunTurn ended. Timings feed the estimators.

    ``switch_s`` is the time the turn waited for its model's weights (what prefetching did not
    hide); ``switch_bytes`` were copied while the turn waited, ``prefetched_bytes`` in the
    background while an earlier turn decoded. ``prefill_s``: the turn's first step (a prefill,
    or new members' prefill with a decode), ``decode_s``: the other ``steps − 1`` (decode); both
    count each step's token delivery, what a step costs the turn. ``exported``: handles of the
    KV left in this worker's host pool for ``RunTurn.export_kv``.
    """

    worker_id: str
    turn_id: int
    model: str
    steps: int
    elapsed_s: float
    switch_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    batch_size: int = 0
    finished: list[str] = []
    swapped_out: list[str] = []
    recomputed: list[str] = []
    # Requests still held on the worker with their generated length, for the scheduler's books.
    progress: dict[str, int] = {}
    switch_bytes: int = 0
    prefetched_bytes: int = 0
    exported: dict[str, KVHandle] = {}
    # Requests whose prefill ran in this turn (a handed-over KV was imported: not among them).
    prefilled: list[str] = []


class RequestDone(msgspec.Struct, tag="request_done", omit_defaults=True):
    """worker → scheduler: a request ended (the gateway got the same news as a TokenEvent)."""

    worker_id: str
    request_id: str
    finish_reason: FinishReason
    num_output_tokens: int
    message: str = ""


class SwitchDone(msgspec.Struct, tag="switch_done", omit_defaults=True):
    """worker → scheduler: the resident model changed. ``seconds``: how long the turn waited
    for the weights; ``bytes``: copied while it waited; ``prefetched_bytes``: copied in the
    background (prefetch) before the switch began."""

    worker_id: str
    from_model: str | None
    to_model: str
    seconds: float
    bytes: int
    prefetched_bytes: int = 0


class KVImported(msgspec.Struct, tag="kv_imported", omit_defaults=True):
    """worker → scheduler: the KV handed over from ``source_worker`` is now in this worker's
    host pool (``ok``), so the source may free its copy; or the import failed (``message``) and
    the request will be re-prefilled here from prompt + tokens."""

    worker_id: str
    request_id: str
    source_worker: str
    ok: bool
    seconds: float = 0.0
    bytes: int = 0
    message: str = ""


class WorkerError(msgspec.Struct, tag="error", omit_defaults=True):
    """worker → scheduler: a command failed. ``request_id`` is set when one request is at fault."""

    worker_id: str
    message: str
    request_id: str | None = None
    turn_id: int | None = None


WorkerEvent = TurnDone | RequestDone | SwitchDone | KVImported | WorkerError


class Heartbeat(msgspec.Struct, omit_defaults=True):
    """worker → scheduler, gateway, model-store (``worker.heartbeat``): liveness and capacity."""

    worker_id: str
    device: str
    role: WorkerRole
    time: float
    # New for every process: a worker restarted under the same id (faster than the heartbeat
    # timeout) holds none of its predecessor's requests, and the scheduler must notice.
    incarnation: str = ""
    node: str = ""  # the host (shared memory) this worker runs on: KV hand-off needs the same node
    resident_model: str | None = None
    arena_bytes: int = 0
    weight_budget_bytes: int = 0
    slot_bytes: int = 0  # one weight slot: the largest model this worker can hold
    kv_block_size: int = 16
    kv_blocks_total: int = 0
    kv_blocks_free: int = 0
    host_kv_bytes_free: int = 0
    num_requests: int = 0
    draining: bool = False
    # The turn being executed (None: idle). A scheduler that believes a turn is running while
    # the worker says it is idle lost the TurnDone (e.g. in a NATS restart) and moves on.
    turn_id: int | None = None


class WorkerState(msgspec.Struct, omit_defaults=True):
    """One worker as the scheduler sees it (part of SchedulerState)."""

    worker_id: str
    role: WorkerRole
    resident_model: str | None = None
    busy: bool = False
    num_requests: int = 0
    kv_usage: float = 0.0


class SchedulerState(msgspec.Struct, omit_defaults=True):
    """scheduler → observers (``scheduler.state``, about once a second): for /health,
    /v1/models and ``aegaeon top``."""

    time: float
    policy: str
    workers: list[WorkerState] = []
    queued: dict[str, int] = {}  # model → requests waiting for a first token
    running: dict[str, int] = {}  # model → requests decoding
    alpha: float | None = None  # last round's α (aegaeon policy)


# ---------------------------------------------------------------- worker → gateway


class TokenEvent(msgspec.Struct, array_like=True, omit_defaults=True):
    """New tokens of one request. ``start`` is the index of the first of them in the output,
    so a gateway can drop a duplicate after a recovery re-run."""

    request_id: str
    start: int
    token_ids: list[int]
    # Per token: [chosen logprob, [[token id, logprob], …top N]]; empty when not asked for.
    logprobs: list[tuple[float, list[tuple[int, float]]]] = []
    finish_reason: FinishReason | None = None
    error: str | None = None


class TokenBatch(msgspec.Struct, array_like=True):
    """worker → gateway (``tokens.<gateway-id>``): every owned request's tokens from one step.
    ``sent_at``: the worker's wall clock (``time.time()``) at publish, so a client on the same
    host can measure what the path after the worker adds (``aegaeon bench stack``)."""

    events: list[TokenEvent]
    sent_at: float = 0.0


# ---------------------------------------------------------------- anyone ↔ model-store


class ModelInfo(msgspec.Struct, omit_defaults=True):
    """A registered model as the model-store describes it."""

    name: str
    architecture: str
    model_type: str
    path: str
    weight_bytes: int
    num_parameters: int
    context_length: int
    dtype: str
    kv_bytes_per_token: int = 0  # layers x 2 x kv_heads x head_dim x dtype size
    cached: bool = False  # weights are in the host cache now
    cache_path: str | None = None
    created: int = 0


class ListModels(msgspec.Struct, tag="list"):
    """→ model-store (``models.list``): every registered model. Reply: ModelList."""


class ModelList(msgspec.Struct):
    """model-store → asker: the registry."""

    models: list[ModelInfo]


class DescribeModel(msgspec.Struct, tag="describe"):
    """→ model-store (``models.describe``). Reply: ModelReply."""

    name: str


class EnsureCached(msgspec.Struct, tag="ensure_cached"):
    """→ model-store (``models.ensure``): load into the host cache if needed. Reply: ModelReply
    with ``cache_path`` set to the single-file safetensors copy in shared memory."""

    name: str


class PrefetchHint(msgspec.Struct, tag="prefetch"):
    """scheduler → model-store (``models.prefetch``): this model is likely needed soon."""

    name: str


class FetchFile(msgspec.Struct, tag="file"):
    """→ model-store (``models.file``): a chunk of a small model file (tokenizer, config), for
    gateways on other nodes. Reply: FileChunk."""

    name: str
    file: str
    offset: int = 0
    length: int = 512 * 1024


class ModelReply(msgspec.Struct, omit_defaults=True):
    """model-store → asker: one model, or an error (then ``model`` is None)."""

    model: ModelInfo | None = None
    error: str = ""


class FileChunk(msgspec.Struct, omit_defaults=True):
    """model-store → asker: bytes of a file; ``total`` is the file's size."""

    data: bytes = b""
    total: int = 0
    error: str = ""


# ---------------------------------------------------------------- encoding

_encoder = msgspec.msgpack.Encoder()
encode = _encoder.encode
"""Encode any struct above to msgpack bytes."""

_decoders: dict[object, msgspec.msgpack.Decoder] = {}


def decode(data: bytes, type_: type | object):
    """Decode msgpack ``data`` as ``type_`` (a Struct or a tagged union such as WorkerCommand).

    Raises msgspec.ValidationError / DecodeError on a malformed message.
    """
    decoder = _decoders.get(type_)
    if decoder is None:
        decoder = _decoders[type_] = msgspec.msgpack.Decoder(type_)
    return decoder.decode(data)
