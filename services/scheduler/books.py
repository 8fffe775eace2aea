"""What the scheduler service remembers beside its policy: who owns each request, which worker
holds it, which turn each worker runs. Pure data, no I/O.

The policy decides *what* runs; these books know *where the bytes are*::

    TrackedRequest  r7: submit (prompt, gateway…), worker "w1" holds it, 12 tokens so far
                    (after a prefill on "p0": its KV handle in p0's host pool, until imported)
    WorkerBook      w1: last heartbeat, turn 1042 in flight (its plan), holds {r7, r9}
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from aegaeon.scheduler.policies.base import InstanceView, ModelSpec, RequestView, TurnPlan

from aegaeon.protocol import Heartbeat, KVHandle, ModelInfo, SubmitRequest, WorkerState


@dataclass
class TrackedRequest:
    """An accepted request that has not ended yet."""

    submit: SubmitRequest
    worker: str | None = None  # the worker that was sent an AssignRequest for it
    generated: int = 0  # output tokens so far (as last reported by a worker)
    # Set after a recovery or a restart: its output tokens must be read back from Redis before it
    # is assigned again, so the new worker continues after what the client already has.
    recovered: bool = False
    previous_worker: str | None = None  # may still hold it (scheduler restart): abort there
    # Prefill → decode on one node: the prefill worker ``kv_source`` left the request's KV in
    # its host pool (``kv``); the decode worker imports it, then the source is told to free it.
    kv: KVHandle | None = None
    kv_source: str | None = None
    reported_position: int | None = None  # the queue position its gateway was last told
    # The gateway stamps arrival on the wall clock; the scheduler's ``now`` is monotonic. The
    # policy compares them (a group's first-token deadline against the time left in a turn),
    # so the view carries the arrival on the monotonic clock, converted once when tracked.
    arrival: float = field(init=False)

    def __post_init__(self) -> None:
        self.generated = max(self.generated, len(self.submit.output_token_ids))
        self.arrival = self.submit.arrival_time - time.time() + time.monotonic()

    @property
    def request_id(self) -> str:
        return self.submit.request_id

    @property
    def started(self) -> bool:
        """It has produced its first token (it is decoding, not waiting for prefill)."""
        return self.generated > 0

    def view(self) -> RequestView:
        """The request as a policy sees it. ``generated`` counts the tokens already sent, so the
        context a re-run must rebuild is prompt + those tokens."""
        return RequestView(
            request_id=self.request_id,
            model=self.submit.model,
            prompt_len=len(self.submit.prompt_token_ids),
            max_tokens=self.submit.sampling.max_tokens,
            arrival=self.arrival,
            generated=self.generated,
        )


class RecentIds:
    """The last ``size`` request ids added, for ``in`` tests; older ones are forgotten."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._ids: dict[str, None] = {}  # insertion-ordered: the oldest first

    def add(self, request_id: str) -> None:
        self._ids[request_id] = None
        if len(self._ids) > self.size:
            del self._ids[next(iter(self._ids))]

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)


@dataclass
class WorkerBook:
    """A worker as the service tracks it."""

    worker_id: str
    last_seen: float  # monotonic time of its last heartbeat
    heartbeat: Heartbeat
    turn: TurnPlan | None = None
    turn_id: int | None = None
    turn_sent_at: float = 0.0
    holds: set[str] = field(default_factory=set)  # request ids it was assigned and still has
    draining: bool = False

    @property
    def idle(self) -> bool:
        return self.turn is None

    def in_turn(self, request_id: str) -> bool:
        return self.turn is not None and request_id in self.turn.request_ids


def instance_view(beat: Heartbeat) -> InstanceView:
    """A heartbeat as the policy's view of that instance."""
    return InstanceView(
        instance_id=beat.worker_id,
        role=beat.role,
        kv_capacity_tokens=beat.kv_blocks_total * beat.kv_block_size or (1 << 20),
        weight_budget_bytes=beat.weight_budget_bytes or (1 << 40),
        resident_model=beat.resident_model,
        node=beat.node or None,
    )


def refresh_view(view: InstanceView, beat: Heartbeat) -> None:
    """Capacity can change (a worker re-carves its arena); busy and resident stay the policy's."""
    fresh = instance_view(beat)
    view.role = fresh.role
    view.kv_capacity_tokens = fresh.kv_capacity_tokens
    view.weight_budget_bytes = fresh.weight_budget_bytes


def counts_by_model(requests: dict[str, TrackedRequest]) -> tuple[dict[str, int], dict[str, int]]:
    """(waiting for a first token, decoding) per model."""
    queued: dict[str, int] = {}
    running: dict[str, int] = {}
    for tracked in requests.values():
        target = running if tracked.started else queued
        target[tracked.submit.model] = target.get(tracked.submit.model, 0) + 1
    return queued, running


def _queue_order(tracked: TrackedRequest) -> tuple[float, str]:
    return tracked.submit.arrival_time, tracked.request_id


def waiting_positions(requests: dict[str, TrackedRequest]) -> dict[str, int]:
    """Each request still waiting for its first token → how many admitted before it (by
    arrival) wait too: its place in the queue, whichever worker will serve it."""
    waiting = sorted((t for t in requests.values() if not t.started), key=_queue_order)
    return {tracked.request_id: position for position, tracked in enumerate(waiting)}


def waiting_ahead(requests: dict[str, TrackedRequest], tracked: TrackedRequest) -> int:
    """``tracked``'s entry of :func:`waiting_positions`, in one pass (no sort: at admission)."""
    order = _queue_order(tracked)
    return sum(1 for t in requests.values() if not t.started and _queue_order(t) < order)


def worker_state(worker: WorkerBook) -> WorkerState:
    """One worker as SchedulerState reports it."""
    beat = worker.heartbeat
    total = beat.kv_blocks_total
    return WorkerState(
        worker_id=worker.worker_id,
        role=beat.role,
        resident_model=beat.resident_model,
        busy=not worker.idle,
        num_requests=len(worker.holds),
        kv_usage=1.0 - beat.kv_blocks_free / total if total > 0 else 0.0,
    )


def model_spec(info: ModelInfo) -> ModelSpec:
    """The model-store's description as the policy's view of a model."""
    return ModelSpec(info.name, info.weight_bytes, info.kv_bytes_per_token, info.context_length,
                     info.priority, info.pin)  # fmt: skip
