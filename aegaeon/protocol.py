"""Every message that crosses a process boundary, defined once.

Payloads are msgpack, encoded from these msgspec Structs (``encode`` / ``decode_*`` below).
Subjects live in :mod:`aegaeon.subjects`. Who sends what to whom::

    gateway ──SubmitRequest (req/reply)──► scheduler ──WorkerCommand──► gpu-worker
       ▲     ──CancelRequest────────────►     ▲                            │
       │                                      └──────WorkerEvent───────────┤
       └──────────────────────TokenBatch (one per engine step)─────────────┘
    gpu-worker ──Heartbeat──► scheduler, gateway, model-store
    anyone ──ModelsQuery (req/reply)──► model-store
    model-store ──StoreHeartbeat──► scheduler (what its node's host cache holds)
    gateway ──DeployModel / DrainModel / RemoveModel / SetServing (req/reply)──► model-store
    gateway ──UnloadModel (req/reply)──► scheduler ──EvictModel──► gpu-worker
    model-store ──ModelChanged──► gateway, scheduler, model-store

Hot-path types are ``array_like`` (no field names on the wire) and ``omit_defaults``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import msgspec

from aegaeon.priority import Priority

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
    queued_ahead: int = 0  # accepted: requests admitted before it still waiting for a first token


class CancelRequest(msgspec.Struct, omit_defaults=True):
    """gateway → scheduler (``requests.cancel``): the client went away or a stop string hit."""

    request_id: str
    reason: str = "abort"


# ---------------------------------------------------------------- scheduler → worker


class KVHandle(msgspec.Struct, frozen=True):
    """Where an exported request's KV lies in a worker's host KV pool (prefill → decode).

    The bytes are ``num_blocks`` whole blocks of shape [layers, 2, block_size, kv_heads, head_dim]
    in ``dtype``, holding the KV of the first ``num_tokens`` tokens of prompt + outputs.
    Produced by ``Engine.export_kv``, sent in ``TurnDone.exported``, carried in
    ``AssignRequest.kv``, consumed by ``Engine.import_kv``. On ``node`` the pool file is mapped
    directly; a worker on another node fetches the bytes from ``endpoint`` (the exporting
    worker's KV transfer server), which serves them only to a client presenting ``token``.
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
    node: str = ""  # the exporting worker's node ("": unknown, taken as the importer's)
    endpoint: str = ""  # host:port of its KV transfer server ("": none, same node only)
    token: bytes = b""  # one-time secret for this KV (the handle travels only on the bus)


class AssignRequest(msgspec.Struct, tag="assign", omit_defaults=True):
    """scheduler → worker: take ownership of a request (it waits for prefill in a turn)."""

    request_id: str
    model: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    gateway_id: str
    arrival_time: float
    output_token_ids: list[int] = []
    # Prefill → decode hand-off: the request's KV lies in ``kv_source``'s host KV pool; the worker
    # copies it into its own pool (mapped on one node, over the network from another) and decodes
    # without a re-prefill (then reports KVImported, after which the source may free it).
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
    prompt and tokens so far, when they next run). ``pinned``: the model the worker keeps in a
    weight slot from now on, never evicted by other models' switches (None: none).
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
    pinned: str | None = None


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


class EvictModel(msgspec.Struct, tag="evict", omit_defaults=True):
    """scheduler → worker: a drained model is being removed: forget it (its weight slot, resident
    or prefetched, its host mapping, its registration). Queued behind the turn in progress, so it
    never lands while a turn runs; a worker still holding requests of it keeps it."""

    model: str


WorkerCommand = (
    AssignRequest | RunTurn | Preempt | AbortRequest | PrefetchModel | Drain | EvictModel
)


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
    background (prefetch) before the switch began; ``staged_while_idle``: that background copy
    began while the worker ran no turn (staged on an idle instance for the next arrival), so it
    was not hidden behind another model's decode."""

    worker_id: str
    from_model: str | None
    to_model: str
    seconds: float
    bytes: int
    prefetched_bytes: int = 0
    staged_while_idle: bool = False


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
    across_nodes: bool = False  # fetched from the source's KV transfer server, not mapped


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
    # host:port of its KV transfer server: exported KV reaches decode workers on other nodes.
    kv_endpoint: str = ""


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
    cached: dict[str, list[str]] = {}  # node → models its stores' host caches hold (as placed by)


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


# ---------------------------------------------------------------- anyone ↔ model-store


ModelState = Literal["loading", "ready", "draining", "failed"]
"""Where a registered model is in its lifecycle (``aegaeon/lifecycle.py`` says which moves are
allowed): ``loading`` deployed, being validated and copied into the host cache; ``ready``
servable; ``draining`` takes no new requests while its queued and running ones finish;
``failed`` its load failed (``state_reason`` says why). A removed model is absent."""


class ModelInfo(msgspec.Struct, omit_defaults=True):
    """A registered model as the model-store describes it. ``state``: the model-store's
    lifecycle state of it (a model found in the models directory is ``ready``); ``cache_store``:
    the id of the store whose host cache ``cached`` and ``cache_path`` speak of (the one that
    answered)."""

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
    state: ModelState = "ready"
    state_reason: str = ""  # why it failed
    cache_store: str | None = None
    priority: Priority = "normal"  # its class against other models' work (aegaeon.priority)
    pin: int = 0  # instances that keep it resident (the aegaeon policy's pinning)
    keep_alive_s: float = 0.0  # idle this long: evicted from workers and host caches (0: never)


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
    with ``cache_path`` set to the single-file safetensors copy in shared memory. ``lease_s``:
    the file stays in the cache at least this long (the asker maps it meanwhile: once mapped,
    an eviction no longer takes its pages)."""

    name: str
    lease_s: float = 0.0


class PrefetchHint(msgspec.Struct, tag="prefetch"):
    """scheduler → model-store (``models.prefetch``): this model is likely needed soon."""

    name: str


class EvictIdle(msgspec.Struct, tag="evict_idle"):
    """scheduler → every model-store (``models.evict``, no queue group, no reply): ``name`` sat
    idle past its keep-alive; drop it from the host cache unless a worker's lease holds it."""

    name: str


class FetchFile(msgspec.Struct, tag="file"):
    """→ model-store (``models.file``): a chunk of a small model file (tokenizer, config), for
    gateways on other nodes. Reply: FileChunk."""

    name: str
    file: str
    offset: int = 0
    length: int = 512 * 1024


class DeployModel(msgspec.Struct, tag="deploy"):
    """gateway → model-store (``models.deploy``): register the Hugging Face folder or ``.gguf``
    file at ``path`` (on the store's node) as ``name`` (default: from the path), as ``aegaeon
    models add`` does, then load it into the host cache in the background, with the serving
    settings ``priority`` and ``pin`` (``aegaeon.serving``). Reply: ModelReply with the model in
    state ``loading``, or an error with its HTTP ``status``."""

    path: str
    name: str | None = None
    priority: Priority = "normal"
    pin: int = 0


class DrainModel(msgspec.Struct, tag="drain"):
    """gateway → model-store (``models.drain``): take no new requests of a ready model (those
    queued and running finish). Reply: ModelReply (state ``draining``)."""

    name: str


class RemoveModel(msgspec.Struct, tag="remove"):
    """gateway → model-store (``models.remove``), after the scheduler unloaded it: take a
    drained (or failed) model out of the models directory, the host cache and the lifecycle
    book. Reply: ModelReply with the model as it was, ``note`` saying what became of its folder."""

    name: str


class SetServing(msgspec.Struct, tag="serving", omit_defaults=True):
    """gateway → model-store (``models.serving``): change a registered model's serving settings
    (``aegaeon.serving``), in any state: those given, the others as they are (None). ``priority``:
    its class (``aegaeon.priority``); ``pin``: the worker instances that keep it resident (0
    unpins); ``keep_alive_s``: the idle time after which it is evicted (0: never). Recorded in
    the lifecycle book and announced as ModelChanged. Reply: ModelReply with the model as it is
    now, or an error with its HTTP ``status`` (404 unknown model; 400 an unknown class, a pin or
    keep-alive out of range, or nothing to set)."""

    name: str
    priority: Priority | None = None
    pin: int | None = None
    keep_alive_s: float | None = None


class ModelReply(msgspec.Struct, omit_defaults=True):
    """model-store → asker: one model, or an error (then ``model`` is None) with the HTTP
    ``status`` a gateway answers it with (the lifecycle verbs set it)."""

    model: ModelInfo | None = None
    error: str = ""
    status: int = 200
    note: str = ""


class ModelChanged(msgspec.Struct, omit_defaults=True):
    """model-store → gateways, scheduler, model-stores (``registry.changed``): a model's lifecycle
    state or its serving settings (priority class, pin) changed (``model`` as it is now), or it
    was removed (``removed``). Caches of the registry update at once instead of at their next
    refresh."""

    model: ModelInfo
    removed: bool = False


class UnloadModel(msgspec.Struct):
    """gateway → scheduler (request/reply on ``scheduler.unload``), before removing a drained
    model: if nothing of it is queued or running, refuse new requests of it from now on and send
    every worker EvictModel. Reply: UnloadReply."""

    name: str


class UnloadReply(msgspec.Struct, omit_defaults=True):
    """scheduler → gateway: ``unloaded``, or not because ``queued`` + ``running`` requests of
    the model have not finished; ``workers``: those told to evict it."""

    unloaded: bool
    queued: int = 0
    running: int = 0
    workers: list[str] = []


class FileChunk(msgspec.Struct, omit_defaults=True):
    """model-store → asker: bytes of a file; ``total`` is the file's size."""

    data: bytes = b""
    total: int = 0
    error: str = ""


class StoreHeartbeat(msgspec.Struct, omit_defaults=True):
    """model-store → scheduler (``models.heartbeat``, every ``interval_s``): the models whose
    weights this store's host cache holds on ``node`` (the ``Heartbeat.node`` of the workers
    there), so placement can prefer a node that needs no fetch. Silent for a few intervals: the
    scheduler forgets what it said."""

    store_id: str
    node: str
    time: float
    cached: list[str] = []  # finished cache files (loads in progress are not yet cached)
    cache_bytes_free: int = 0
    cache_bytes_total: int = 0
    interval_s: float = 1.0
    # host:port another node's store copies cached weights from ("": it shares none).
    transfer_endpoint: str = ""
    peer_loads: int = 0  # misses this store filled from another node's cache, since it started
    peer_bytes: int = 0


class ShareCached(msgspec.Struct, omit_defaults=True):
    """model-store → another node's model-store (``models.share.<store id>``, request): offer me
    your cached file of ``name``, if it was made from the weights with this ``signature``."""

    name: str
    signature: str


class SharedWeights(msgspec.Struct, omit_defaults=True):
    """Reply to ShareCached: fetch ``nbytes`` from ``endpoint`` with ``token`` (once, within a
    couple of minutes; the file stays leased meanwhile), or ``error``."""

    endpoint: str = ""
    token: bytes = b""
    nbytes: int = 0
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
