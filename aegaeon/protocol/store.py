"""The model-store's messages: queries and lifecycle changes of the registry, host-cache
ensures and hints, file reads, and each store's heartbeat of what its node caches."""

from __future__ import annotations

from typing import Literal

import msgspec

from aegaeon.priority import Priority

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
