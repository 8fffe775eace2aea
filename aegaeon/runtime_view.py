"""What a deployment is doing now, as one JSON document and a stream of events. Pure: built from
what the bus says (worker heartbeats, the scheduler's state, worker events), so the gateway
serves it (``GET /v1/aegaeon/runtime``, ``GET /v1/aegaeon/events``) and ``aegaeon top`` draws
it, and both are tested without a cluster::

    {"time": …, "scheduler": {"alive": true, "policy": "aegaeon", "alpha": 0.62},
     "workers": [{"worker_id": "worker-0", "node": "…", "role": "both", "resident_model": …,
                  "requests": 3, "kv_usage": 0.41, "draining": false, "age_s": 0.4}],
     "models": [{"model": "demo-llama", "state": "ready", "priority": "normal", "pin": 0,
                 "queued": 2, "running": 3, "resident_on": ["worker-0"]}],
     "recent": [{"kind": "switch", "time": …, "worker_id": …, "from_model": …, "to_model": …,
                 "seconds": …, "bytes": …, "prefetched_bytes": …}, …]}

Events are switches (a worker's resident model changed), preemptions (a turn ended with KV swapped
out to the host) and hand-offs (a decode worker imported the KV a prefill worker left).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from aegaeon.protocol import (
    Heartbeat,
    KVImported,
    ModelInfo,
    SchedulerState,
    SwitchDone,
    TurnDone,
)

RECENT_EVENTS = 100
"""How many past events the runtime view keeps."""


def event_record(event: object, at: float) -> dict[str, Any] | None:
    """A worker event as the runtime view shows it (``at``: wall-clock time it was heard), or None
    for the events it does not show (request ends, turns without a preemption, errors)."""
    if isinstance(event, SwitchDone):
        return {"kind": "switch", "time": at, "worker_id": event.worker_id,
                "from_model": event.from_model, "to_model": event.to_model,
                "seconds": event.seconds, "bytes": event.bytes,
                "prefetched_bytes": event.prefetched_bytes}  # fmt: skip
    if isinstance(event, TurnDone) and event.swapped_out:
        return {"kind": "preemption", "time": at, "worker_id": event.worker_id,
                "model": event.model, "requests": list(event.swapped_out)}  # fmt: skip
    if isinstance(event, KVImported):
        return {"kind": "handoff", "time": at, "worker_id": event.worker_id,
                "source_worker": event.source_worker, "request_id": event.request_id,
                "ok": event.ok, "seconds": event.seconds, "bytes": event.bytes,
                "across_nodes": event.across_nodes}  # fmt: skip
    return None


def shows(record: dict[str, Any], visible: Callable[[str], bool]) -> bool:
    """Whether an event names only models ``visible`` lets the viewer see (an API key sees only
    the models it may use)."""
    names = (record.get(k) for k in ("model", "from_model", "to_model"))
    return all(visible(name) for name in names if name)


def runtime_document(
    beats: Iterable[Heartbeat],
    state: SchedulerState | None,
    recent: Iterable[dict[str, Any]],
    now: float,
    visible: Callable[[str], bool] = lambda _model: True,
    registry: Iterable[ModelInfo] = (),
) -> dict[str, Any]:
    """The runtime view from the live workers' last heartbeats, the live scheduler's last state
    (None: no scheduler heard lately) and the recent events, at wall-clock ``now``; models the
    viewer may not see (``visible``) are left out, and so are the events naming them. Every
    model of ``registry`` (the model-store's) is listed with its lifecycle state, priority class
    and pin count, idle ones included; a model only workers or the scheduler speak of has
    None there."""
    beats = sorted(beats, key=lambda b: b.worker_id)

    def seen(model: str | None) -> str | None:
        return model if model and visible(model) else None

    workers: list[dict[str, Any]] = [
        {"worker_id": b.worker_id, "node": b.node, "role": b.role, "device": b.device,
         "resident_model": seen(b.resident_model), "requests": b.num_requests,
         "kv_usage": 1 - b.kv_blocks_free / b.kv_blocks_total if b.kv_blocks_total else 0.0,
         "draining": b.draining, "busy": b.turn_id is not None, "age_s": max(0.0, now - b.time)}
        for b in beats
    ]  # fmt: skip
    resident: dict[str, list[str]] = {}
    for worker in workers:
        if worker["resident_model"]:
            resident.setdefault(worker["resident_model"], []).append(worker["worker_id"])
    queued = state.queued if state else {}
    running = state.running if state else {}
    known = {info.name: info for info in registry}
    models = [
        {"model": m, "state": known[m].state if m in known else None,
         "priority": known[m].priority if m in known else None,
         "pin": known[m].pin if m in known else None,
         "keep_alive_s": known[m].keep_alive_s if m in known else None,
         "queued": queued.get(m, 0), "running": running.get(m, 0),
         "resident_on": resident.get(m, [])}
        for m in sorted({*known, *queued, *running, *resident}) if visible(m)
    ]  # fmt: skip
    scheduler = {"alive": state is not None, "policy": state.policy if state else None,
                 "alpha": state.alpha if state else None}  # fmt: skip
    return {"time": now, "scheduler": scheduler, "workers": workers, "models": models,
            "recent": [e for e in recent if shows(e, visible)]}  # fmt: skip


def switches_per_second(recent: Iterable[dict[str, Any]], now: float, window: float = 10.0) -> float:  # fmt: skip
    """Switches among ``recent`` in the last ``window`` seconds, per second."""
    return sum(1 for e in recent if e["kind"] == "switch" and now - e["time"] <= window) / window
