"""Every message that crosses a process boundary, defined once.

Payloads are msgpack, encoded from these msgspec Structs (``encode`` / ``decode`` below).
Subjects live in :mod:`aegaeon.subjects`. Who sends what to whom::

    gateway ──SubmitRequest (req/reply)──► scheduler ──WorkerCommand──► gpu-worker
       ▲     ──CancelRequest────────────►     ▲                            │
       │                                      └──────WorkerEvent───────────┤
       └──────────────────────TokenBatch (one per engine step)─────────────┘
    gpu-worker ──Heartbeat──► scheduler, gateway, model-store
    anyone ──ListModels / DescribeModel / EnsureCached / FetchFile (req/reply)──► model-store
    model-store ──StoreHeartbeat──► scheduler (what its node's host cache holds)
    gateway ──DeployModel / DrainModel / RemoveModel / SetServing (req/reply)──► model-store
    gateway ──UnloadModel (req/reply)──► scheduler ──EvictModel──► gpu-worker
    model-store ──ModelChanged──► gateway, scheduler, model-store

Hot-path types are ``array_like`` (no field names on the wire) and ``omit_defaults``.

The types live by who speaks them: ``requests`` (a request's submit, cancel and token stream),
``worker`` (scheduler ↔ gpu-worker commands, events, heartbeats), ``store`` (the model-store's
registry, cache and file messages); import them from here.
"""

from __future__ import annotations

import msgspec

from aegaeon.protocol.requests import (
    CancelRequest,
    FinishReason,
    RequestStatus,
    SamplingParams,
    SubmitReply,
    SubmitRequest,
    TokenBatch,
    TokenEvent,
    status_batches,
)
from aegaeon.protocol.store import (
    DeployModel,
    DescribeModel,
    DrainModel,
    EnsureCached,
    EvictIdle,
    FetchFile,
    FileChunk,
    ListModels,
    ModelChanged,
    ModelInfo,
    ModelList,
    ModelReply,
    ModelState,
    PrefetchHint,
    RemoveModel,
    SetServing,
    ShareCached,
    SharedWeights,
    StoreHeartbeat,
    UnloadModel,
    UnloadReply,
)
from aegaeon.protocol.worker import (
    AbortRequest,
    AssignRequest,
    Drain,
    EvictModel,
    Heartbeat,
    KVHandle,
    KVImported,
    Preempt,
    PrefetchModel,
    RequestDone,
    RunTurn,
    SchedulerState,
    SwitchDone,
    TurnDone,
    WorkerCommand,
    WorkerError,
    WorkerEvent,
    WorkerRole,
    WorkerState,
)

__all__ = [
    "AbortRequest",
    "AssignRequest",
    "CancelRequest",
    "DeployModel",
    "DescribeModel",
    "Drain",
    "DrainModel",
    "EnsureCached",
    "EvictIdle",
    "EvictModel",
    "FetchFile",
    "FileChunk",
    "FinishReason",
    "Heartbeat",
    "KVHandle",
    "KVImported",
    "ListModels",
    "ModelChanged",
    "ModelInfo",
    "ModelList",
    "ModelReply",
    "ModelState",
    "Preempt",
    "PrefetchHint",
    "PrefetchModel",
    "RemoveModel",
    "RequestDone",
    "RequestStatus",
    "RunTurn",
    "SamplingParams",
    "SchedulerState",
    "SetServing",
    "ShareCached",
    "SharedWeights",
    "StoreHeartbeat",
    "SubmitReply",
    "SubmitRequest",
    "SwitchDone",
    "TokenBatch",
    "TokenEvent",
    "TurnDone",
    "UnloadModel",
    "UnloadReply",
    "WorkerCommand",
    "WorkerError",
    "WorkerEvent",
    "WorkerRole",
    "WorkerState",
    "decode",
    "encode",
    "status_batches",
]

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
