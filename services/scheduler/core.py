"""What every part of the scheduler service shares: its knobs, its books (the policy, the
tracked requests, the workers), re-admitting a request, ending a turn, and ending a request
(with the hand-off's exported KV freed at its source)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aegaeon.scheduler.books import RecentIds, TrackedRequest, WorkerBook
from aegaeon.scheduler.locality import DEFAULT_FETCH_BYTES_PER_S, NodeCaches
from aegaeon.scheduler.policies.base import ModelSpec, Policy, Slo, TurnPlan, TurnResult
from aegaeon.scheduler.store import RequestStore

from aegaeon.bus import Bus
from aegaeon.priority import DEFAULT_MAX_WAIT_S
from aegaeon.protocol import AbortRequest, ModelState, SubmitReply, TokenBatch, TokenEvent
from aegaeon.telemetry import RequestTrace

log = logging.getLogger(__name__)

ENDED_IDS_KEPT = 10_000
"""How many ended request ids the scheduler remembers (~1.5 MB), so a submit sent again moments
after its request ended is not run: Redis records the end a moment after the books drop it."""

EstimatorFactory = Callable[[dict[str, ModelSpec]], Any]
"""Builds the policy's step-time estimator once the models are known (None: policy defaults)."""


@dataclass(frozen=True)
class SchedulerConfig:
    """Knobs of the scheduler service, checked once at construction."""

    policy: str = "aegaeon"
    slo: Slo = field(default_factory=Slo)
    policy_options: dict[str, Any] = field(default_factory=dict)
    heartbeat_timeout_s: float = 3.0  # a worker silent this long is dead
    max_queue: int = 1024  # requests waiting for their first token before 503
    retry_after_s: float = 1.0
    turn_timeout_s: float = 300.0  # beyond the quota; covers a cold load into the host cache
    models_refresh_s: float = 5.0
    state_interval_s: float = 1.0
    check_interval_s: float = 0.25
    models_wait_s: float = 5.0  # at start, how long to wait for the model-store
    # The locality hint's price of a model a node's host cache lacks: its bytes at this rate.
    fetch_bytes_per_s: float = DEFAULT_FETCH_BYTES_PER_S
    # A first token's wait past which a model's priority class stops counting (no starvation).
    max_wait_s: float = DEFAULT_MAX_WAIT_S

    def __post_init__(self) -> None:
        if self.heartbeat_timeout_s <= 0 or self.turn_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        if self.fetch_bytes_per_s <= 0:
            raise ValueError("fetch_bytes_per_s must be positive")
        if self.max_queue < 1:
            raise ValueError("max_queue must be at least 1")


class ServiceCore(ABC):
    """The state every part of the service shares, and what all of them do with it."""

    def __init__(
        self,
        config: SchedulerConfig,
        bus: Bus,
        store: RequestStore,
        estimator_factory: EstimatorFactory | None = None,
    ) -> None:
        self.config = config
        self.bus = bus
        self.subjects = bus.subjects
        self.store = store
        self.estimator_factory = estimator_factory
        self.models: dict[str, ModelSpec] = {}
        self.model_states: dict[str, tuple[ModelState, str]] = {}  # lifecycle state, reason
        self.keep_alive_s: dict[str, float] = {}  # each model's idle time before eviction
        self.policy: Policy | None = None
        self.estimator: Any = None  # the policy's step-time estimator (None: its default)
        self.requests: dict[str, TrackedRequest] = {}
        # Requests that ended here lately: a submit of one again (a gateway re-sends its submit
        # after a bus reconnect) must not run it twice. Redis says so for older ones.
        self.ended = RecentIds(ENDED_IDS_KEPT)
        # Cancels of requests not (yet) in the books: a gateway cancels a submit it gave up
        # waiting for, which this scheduler may still be admitting (loading models, waiting
        # for a worker): it must not then run for nobody.
        self.cancelled_unseen = RecentIds(ENDED_IDS_KEPT)
        self.workers: dict[str, WorkerBook] = {}
        # What each node's host cache holds (model-store heartbeats): the policy's locality hint
        # once a store is heard.
        self.node_caches = NodeCaches(self.models, config.fetch_bytes_per_s)
        self._deferred_cancel: set[str] = set()  # ended mid-turn: tell the policy after turn_done
        # request id → the gateway's trace context: spans and commands for one request name it,
        # not whichever request's handler happened to trigger the dispatch.
        self._traces: dict[str, RequestTrace] = {}
        self._turn_ids = itertools.count(time.time_ns() // 1000)  # unique across restarts
        self._tasks: set[asyncio.Task] = set()
        self.ready = asyncio.Event()  # set once the queue left by a previous run is re-admitted

    def _spawn(self, coro: Any) -> None:
        """Fire-and-forget I/O that must not hold up the handler (kept so it is not collected)."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def _policy(self) -> Policy:
        assert self.policy is not None, "run() builds the policy first"
        return self.policy

    def _live_workers(self) -> list[WorkerBook]:
        return [w for w in self.workers.values() if not w.draining]

    @abstractmethod
    async def _dispatch(self) -> None:
        """Give every idle worker its next turn (dispatch.py)."""

    @abstractmethod
    async def _retire(self, worker_id: str, why: str) -> None:
        """A worker is gone: re-run its requests elsewhere (liveness.py)."""

    # ================================================================== (re-)admitting

    def _admit(self, tracked: TrackedRequest) -> SubmitReply | None:
        """Hand a request to the policy and track it (synchronous)."""
        rejection = self._policy.submit(tracked.view(), time.monotonic())
        if rejection is not None:
            return SubmitReply(False, rejection.reason, rejection.status, rejection.retry_after)
        self.requests[tracked.request_id] = tracked
        return None

    def _check_resumable(self, tracked: TrackedRequest) -> SubmitReply | None:
        if tracked.submit.model not in self.models:
            return SubmitReply(False, f"model {tracked.submit.model!r} is gone", 404)
        if not self._live_workers():
            return SubmitReply(False, "no worker available", 503)
        return None

    # ================================================================== ending turns

    def _end_turn(self, worker: WorkerBook, result: TurnResult) -> TurnPlan:
        """The worker is idle again: tell the policy, then the cancels that waited for it."""
        plan = worker.turn
        assert plan is not None
        worker.turn, worker.turn_id = None, None
        self._policy.turn_done(worker.worker_id, plan, result, time.monotonic())
        self._flush_deferred_cancels()
        return plan

    def _flush_deferred_cancels(self) -> None:
        """Tell the policy about requests that ended mid-turn, now that no turn holds them."""
        for request_id in list(self._deferred_cancel):
            if not any(w.in_turn(request_id) for w in self.workers.values()):
                self._deferred_cancel.discard(request_id)
                if request_id in self._policy.requests:
                    self._policy.cancel(request_id)

    # ================================================================== handed-over KV

    def _take_kv(self, tracked: TrackedRequest) -> str | None:
        """Forget the request's exported KV; returns the worker that must free it (None: none,
        or the request's holder is that worker again and keeps it)."""
        source, tracked.kv, tracked.kv_source = tracked.kv_source, None, None
        return source if source != tracked.worker else None

    async def _free_kv(self, source: str | None, request_id: str) -> None:
        """Tell the prefill worker that kept a request's KV for a hand-off to free it (before
        any later command for the request, so an abort never overtakes a new assignment)."""
        if source is not None:
            await self.bus.publish(self.subjects.worker_cmd(source), AbortRequest(request_id))

    # ================================================================== ending requests

    def _forget(self, tracked: TrackedRequest) -> None:
        """Drop a request from the books and the policy (after the turn that holds it)."""
        self.requests.pop(tracked.request_id, None)
        self.ended.add(tracked.request_id)
        self._traces.pop(tracked.request_id, None)
        source = self._take_kv(tracked)
        if source is not None:  # it ended before the decode worker imported its KV
            self._spawn(self._free_kv(source, tracked.request_id))
        for worker in self.workers.values():
            worker.holds.discard(tracked.request_id)
        if any(w.in_turn(tracked.request_id) for w in self.workers.values()):
            self._deferred_cancel.add(tracked.request_id)
        elif tracked.request_id in self._policy.requests:
            self._policy.cancel(tracked.request_id)

    async def _fail(self, tracked: TrackedRequest, message: str) -> None:
        """End a request with an error event to its gateway, so the client never hangs."""
        self._forget(tracked)
        event = TokenEvent(
            tracked.request_id, tracked.generated, [], finish_reason="error", error=message
        )
        await self.bus.publish(self.subjects.tokens(tracked.submit.gateway_id), TokenBatch([event]))
        await self.store.finish(tracked.request_id, "error", tracked.generated)

    async def _complete(self, tracked: TrackedRequest, produced: int) -> None:
        """A recovered request already has all its tokens: end it (the gateway drops the repeat
        finish if the lost worker's last event did reach it)."""
        self._forget(tracked)
        event = TokenEvent(tracked.request_id, produced, [], finish_reason="length")
        await self.bus.publish(self.subjects.tokens(tracked.submit.gateway_id), TokenBatch([event]))
        await self.store.finish(tracked.request_id, "length", produced)
