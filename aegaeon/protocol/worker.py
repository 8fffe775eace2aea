"""The scheduler's commands to a gpu-worker, the worker's events back, and the heartbeats and
state snapshots that say what each worker holds."""

from __future__ import annotations

from typing import Literal

import msgspec

from aegaeon.protocol.requests import FinishReason, SamplingParams

WorkerRole = Literal["prefill", "decode", "both"]


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
