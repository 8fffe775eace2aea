"""Pydantic models of ``GET /v1/aegaeon/runtime`` (the document ``aegaeon.runtime_view`` builds),
so the OpenAPI schema describes it."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class RuntimeScheduler(BaseModel):
    """The scheduler as last heard: ``alive`` False when none was heard lately."""

    alive: bool
    policy: str | None
    alpha: float | None


class RuntimeWorker(BaseModel):
    """One live worker, from its last heartbeat."""

    worker_id: str
    node: str
    role: str
    device: str
    resident_model: str | None
    requests: int
    kv_usage: float
    draining: bool
    busy: bool
    age_s: float


class RuntimeModel(BaseModel):
    """One registered model, or one with work or a resident copy: its lifecycle state,
    priority class and pin count (None: not in the registry), waiting, decoding, and where it
    is resident."""

    model: str
    state: str | None
    priority: str | None
    pin: int | None
    queued: int
    running: int
    resident_on: list[str]


class RuntimeResponse(BaseModel):
    """What the deployment is doing now; ``recent``: the last switches, preemptions and
    hand-offs (each a ``kind`` and its fields)."""

    time: float
    scheduler: RuntimeScheduler
    workers: list[RuntimeWorker]
    models: list[RuntimeModel]
    recent: list[dict[str, Any]]
