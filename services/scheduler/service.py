"""The scheduler service: a thin NATS + Redis shell around a pure :class:`Policy`.

Every handler changes the policy and the books in one synchronous block (no ``await`` inside),
then does its I/O; asyncio runs one coroutine at a time, so the state is never seen half-done::

    requests.submit ──► validate ─► persist (Redis queue) ─► policy.submit ─► reply ─┐
    worker.heartbeat ─► instance joins / stays alive ───────────────────────────────┤
    worker.*.events ──► TurnDone → policy.turn_done; RequestDone → forget ──────────┼─► dispatch:
    requests.cancel ──► policy.cancel, AbortRequest to the holder ──────────────────┤   idle worker →
    every 0.25 s ─────► dead workers → re-run their requests elsewhere; stuck turns ┘   next_turn →
                                                                                         Assign…, RunTurn
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aegaeon.scheduler.books import (
    TrackedRequest,
    WorkerBook,
    counts_by_model,
    instance_view,
    model_spec,
    refresh_view,
    step_times,
    worker_state,
)
from aegaeon.scheduler.policies import make_policy
from aegaeon.scheduler.policies.base import ModelSpec, Policy, Slo, TurnPlan, TurnResult
from aegaeon.scheduler.store import RequestStore
from opentelemetry import trace

from aegaeon import metrics
from aegaeon.bus import Bus, context_from
from aegaeon.protocol import (
    AbortRequest,
    AssignRequest,
    CancelRequest,
    Heartbeat,
    KVHandle,
    KVImported,
    ListModels,
    ModelList,
    PrefetchHint,
    RequestDone,
    RunTurn,
    SchedulerState,
    SubmitReply,
    SubmitRequest,
    TokenBatch,
    TokenEvent,
    TurnDone,
    WorkerError,
    WorkerEvent,
)
from aegaeon.telemetry import NO_TRACE, RequestTrace, record_span, tracer

log = logging.getLogger(__name__)

LOST_TURN_GRACE_S = 3.0
"""How long after sending a turn a worker may still report no turn before it counts as lost
(the RunTurn may wait behind other commands)."""
_tracer = tracer(__name__)

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

    def __post_init__(self) -> None:
        if self.heartbeat_timeout_s <= 0 or self.turn_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        if self.max_queue < 1:
            raise ValueError("max_queue must be at least 1")


class SchedulerService:
    """The control plane. Build it, then ``await run(stop_event)``."""

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
        self.policy: Policy | None = None
        self.estimator: Any = None  # the policy's step-time estimator (None: its default)
        self.requests: dict[str, TrackedRequest] = {}
        self.workers: dict[str, WorkerBook] = {}
        self._deferred_cancel: set[str] = set()  # ended mid-turn: tell the policy after turn_done
        # request id → the gateway's trace context: spans and commands for one request name it,
        # not whichever request's handler happened to trigger the dispatch.
        self._traces: dict[str, RequestTrace] = {}
        self._turn_ids = itertools.count(time.time_ns() // 1000)  # unique across restarts
        self._tasks: set[asyncio.Task] = set()
        self.ready = asyncio.Event()  # set once the queue left by a previous run is re-admitted

    # ================================================================== life cycle

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set, then drain the subscriptions."""
        await self._load_models(wait_s=self.config.models_wait_s)
        estimator = self.estimator_factory(dict(self.models)) if self.estimator_factory else None
        self.policy = make_policy(
            self.config.policy, dict(self.models), self.config.slo, estimator,
            **self.config.policy_options,
        )  # fmt: skip
        self.estimator = estimator if estimator is not None else getattr(self.policy, "est", None)
        subs = [
            await self.bus.subscribe(self.subjects.heartbeat, Heartbeat, self._on_heartbeat),
            await self.bus.subscribe(self.subjects.all_worker_events, WorkerEvent, self._on_event),
            await self.bus.subscribe(self.subjects.submit, SubmitRequest, self._on_submit),
            await self.bus.subscribe(self.subjects.cancel, CancelRequest, self._on_cancel),
        ]
        loops = [
            self._every(self.config.check_interval_s, self._check_workers),
            self._every(self.config.state_interval_s, self._publish_state),
            self._every(self.config.models_refresh_s, self._load_models),
            self._resume(),
        ]
        tasks = [asyncio.create_task(loop) for loop in loops]
        log.info("scheduler ready: policy %s, %d models", self.config.policy, len(self.models))
        await stop.wait()
        for sub in subs:
            await sub.unsubscribe()
        for task in [*tasks, *self._tasks]:
            task.cancel()
        await asyncio.gather(*tasks, *self._tasks, return_exceptions=True)

    async def _every(self, interval: float, job: Callable[[], Any]) -> None:
        """Run ``job`` forever; one failure is logged, never ends the loop."""
        while True:
            await asyncio.sleep(interval)
            try:
                await job()
            except Exception:
                log.exception("periodic %s failed", getattr(job, "__name__", job))

    def _spawn(self, coro: Any) -> None:
        """Fire-and-forget I/O that must not hold up the handler (kept so it is not collected)."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def _policy(self) -> Policy:
        assert self.policy is not None, "run() builds the policy first"
        return self.policy

    # ================================================================== models

    async def _load_models(self, wait_s: float = 0.0) -> None:
        """Ask the model-store for the registry; new models are told to the policy."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                reply = await self.bus.request(
                    self.subjects.models("list"), ListModels(), ModelList, timeout=2.0
                )
                break
            except Exception as exc:  # no model-store (yet): try again later
                if time.monotonic() >= deadline:
                    log.debug("model list unavailable: %s", exc)
                    return
                await asyncio.sleep(0.2)
        for info in reply.models:
            spec = model_spec(info)
            if self.models.get(info.name) != spec:
                self.models[info.name] = spec
                if self.policy is not None:
                    self.policy.add_model(spec)

    # ================================================================== admission

    async def _on_submit(self, request: SubmitRequest, msg: Any) -> None:
        # A child of the gateway's span: the request's trace shows its admission here.
        with _tracer.start_as_current_span("scheduler.submit", context=context_from(msg)) as span:
            span.set_attribute("aegaeon.request_id", request.request_id)
            span.set_attribute("aegaeon.model", request.model)
            await self._submit(request, msg)

    async def _submit(self, request: SubmitRequest, msg: Any) -> None:
        if request.model not in self.models:
            await self._load_models()  # it may have been registered a moment ago
        await self._wait_for_a_worker()
        rejection = self._check_admission(request)
        if rejection is None and request.request_id not in self.requests:
            await self.store.persist(request)
            rejection = self._admit(TrackedRequest(request))
            if rejection is not None:
                await self.store.forget_queued(request.request_id)
            else:
                self._traces[request.request_id] = RequestTrace(context_from(msg))
        await self.bus.reply(msg, rejection or SubmitReply(accepted=True))
        await self._dispatch()

    async def _wait_for_a_worker(self) -> None:
        """Just after a (re)start the workers' heartbeats have not arrived yet: wait one
        heartbeat timeout for a worker before answering "no worker available"."""
        deadline = time.monotonic() + self.config.heartbeat_timeout_s
        while not self._live_workers() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def _check_admission(self, request: SubmitRequest) -> SubmitReply | None:
        """Reasons to refuse before the policy is asked (None: go ahead)."""
        spec = self.models.get(request.model)
        if spec is None:
            return SubmitReply(False, f"model {request.model!r} does not exist", 404)
        if not request.prompt_token_ids or request.sampling.max_tokens < 1:
            return SubmitReply(False, "empty prompt or max_tokens < 1", 400)
        used = len(request.prompt_token_ids) + len(request.output_token_ids)
        if used >= spec.context_length:
            return SubmitReply(
                False, f"{used} tokens do not fit the context of {spec.context_length}", 413
            )
        if len(request.prompt_token_ids) + request.sampling.max_tokens > spec.context_length:
            return SubmitReply(False, "prompt + max_tokens exceed the model's context", 400)
        if not self._live_workers():
            return SubmitReply(False, "no worker available", 503, self.config.retry_after_s)
        largest = max(w.heartbeat.weight_budget_bytes for w in self._live_workers())
        if largest and spec.weight_bytes > largest:
            return SubmitReply(
                False,
                f"model {request.model!r} has {spec.weight_bytes} bytes of weights; the largest "
                f"worker holds {largest} bytes of weights, so no worker can serve it",
                400,
            )
        waiting = sum(1 for r in self.requests.values() if not r.started)
        if waiting >= self.config.max_queue:
            return SubmitReply(False, "scheduler queue is full", 503, self.config.retry_after_s)
        return None

    def _admit(self, tracked: TrackedRequest) -> SubmitReply | None:
        """Hand a request to the policy and track it (synchronous)."""
        rejection = self._policy.submit(tracked.view(), time.monotonic())
        if rejection is not None:
            return SubmitReply(False, rejection.reason, rejection.status, rejection.retry_after)
        self.requests[tracked.request_id] = tracked
        return None

    async def _resume(self) -> None:
        """Re-admit what a previous scheduler accepted and did not finish (its Redis queue)."""
        deadline = time.monotonic() + self.config.heartbeat_timeout_s
        while not self._live_workers() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # workers heartbeat every second: give them one round
        for submit, worker, produced in await self.store.queued():
            if submit.request_id in self.requests:
                continue
            tracked = TrackedRequest(submit, generated=produced, recovered=True)
            tracked.previous_worker = worker
            rejection = self._check_resumable(tracked) or self._admit(tracked)
            if rejection is not None:
                await self._fail(tracked, f"not resumed: {rejection.reason}")
        log.info("resumed %d requests from Redis", len(self.requests))
        self.ready.set()
        await self._dispatch()

    def _check_resumable(self, tracked: TrackedRequest) -> SubmitReply | None:
        if tracked.submit.model not in self.models:
            return SubmitReply(False, f"model {tracked.submit.model!r} is gone", 404)
        if not self._live_workers():
            return SubmitReply(False, "no worker available", 503)
        return None

    # ================================================================== dispatch

    def _live_workers(self) -> list[WorkerBook]:
        return [w for w in self.workers.values() if not w.draining]

    async def _dispatch(self) -> None:
        """Give every idle worker its next turn."""
        if self.policy is None:
            return
        for plan in self._plan_idle():
            await self._send_turn(plan)

    def _plan_idle(self) -> list[tuple[TurnPlan, int]]:
        """Ask the policy for each idle worker's next turn and mark it busy (synchronous)."""
        plans = []
        now = time.monotonic()
        for worker in self._live_workers():
            if not worker.idle:
                continue
            plan = self._policy.next_turn(worker.worker_id, now)
            if plan is None:
                continue
            worker.turn, worker.turn_id, worker.turn_sent_at = plan, next(self._turn_ids), now
            plans.append((plan, worker.turn_id))
        return plans

    async def _send_turn(self, planned: tuple[TurnPlan, int]) -> None:
        plan, turn_id = planned
        worker = self.workers.get(plan.instance_id)
        if worker is None:
            return  # died while we planned
        subject = self.subjects.worker_cmd(worker.worker_id)
        started_ns = time.time_ns()
        for request_id in plan.request_ids:
            tracked = self.requests.get(request_id)
            if tracked is not None and request_id not in worker.holds:
                await self._assign(worker, tracked)
        command = RunTurn(
            turn_id=turn_id,
            model=plan.model,
            request_ids=list(plan.request_ids),
            quota_s=plan.quota_s,
            prefetch_model=plan.prefetch_model,
            swap_out_after=plan.swap_out_after,
            max_steps=plan.max_steps,
            prefill_only=plan.prefill_only,
            export_kv=self._exports(plan, worker.worker_id),
        )
        spans = self._dispatch_spans(plan, turn_id, worker.worker_id, started_ns)
        # The worker's turn span goes under the batch's first request (the others link to it).
        lead = trace.set_span_in_context(spans[0]) if spans else NO_TRACE
        await self.bus.publish(subject, command, context=lead)
        for span in spans:
            span.end()
        self._count_turn(plan)
        if plan.prefetch_model:
            await self.bus.publish(
                self.subjects.models("prefetch"), PrefetchHint(plan.prefetch_model), context=lead
            )

    def _exports(self, plan: TurnPlan, worker_id: str) -> list[str]:
        """Requests whose KV the prefill worker leaves in its host pool for their decode worker:
        those whose target is on the same node (elsewhere the target re-prefills)."""
        return [
            request_id
            for request_id, target in plan.handoff.items()
            if target != worker_id and self._same_node(worker_id, target)
        ]

    def _same_node(self, a: str, b: str) -> bool:
        """Both workers heartbeat the same (named) node: they share its memory."""
        first, second = self.workers.get(a), self.workers.get(b)
        if first is None or second is None:
            return False
        return bool(first.heartbeat.node) and first.heartbeat.node == second.heartbeat.node

    def _dispatch_spans(
        self, plan: TurnPlan, turn_id: int, worker_id: str, started_ns: int
    ) -> list[trace.Span]:
        """One ``aegaeon.dispatch`` span per traced request of the turn, still open."""
        attributes: dict[str, str | int | float | bool] = {
            "aegaeon.turn_id": turn_id,
            "aegaeon.worker_id": worker_id,
            "aegaeon.model": plan.model,
            "aegaeon.quota_s": plan.quota_s,
            "aegaeon.batch_size": len(plan.request_ids),
            "aegaeon.prefill_only": plan.prefill_only,
            "aegaeon.swap_out_after": plan.swap_out_after,
        }
        spans = []
        for request_id in plan.request_ids:
            traced = self._traces.get(request_id)
            if traced is not None:
                spans.append(
                    _tracer.start_span(
                        "aegaeon.dispatch",
                        context=traced.context,
                        start_time=started_ns,
                        attributes={**attributes, "aegaeon.request_id": request_id},
                    )
                )
        return spans

    def _count_turn(self, plan: TurnPlan) -> None:
        metrics.TURN_QUOTA.labels(plan.model).observe(plan.quota_s)
        metrics.TURNS_DISPATCHED.labels(plan.model).inc()
        alpha = getattr(self.policy, "last_alpha", None)
        if alpha is not None:
            metrics.ROUND_ALPHA.set(float(alpha))

    def _end_queue_wait(self, tracked: TrackedRequest, worker_id: str) -> None:
        """The request reached a worker for the first time: its queue wait is over."""
        traced = self._traces.get(tracked.request_id)
        if traced is None or not traced.open:
            return
        traced.open = False
        now = time.time_ns()
        metrics.REQUEST_QUEUE_TIME.labels(tracked.submit.model).observe(
            (now - traced.since_ns) / 1e9
        )
        record_span(
            "aegaeon.queue_wait", traced.context, traced.since_ns, now,
            {"aegaeon.request_id": tracked.request_id, "aegaeon.model": tracked.submit.model,
             "aegaeon.worker_id": worker_id},
        )  # fmt: skip

    async def _assign(self, worker: WorkerBook, tracked: TrackedRequest) -> None:
        """Send a worker a request; a recovered one continues after the tokens already sent."""
        outputs = list(tracked.submit.output_token_ids)
        if tracked.recovered:
            stored = await self.store.output_tokens(tracked.request_id)
            if stored is not None and len(stored) > len(outputs):
                outputs = stored
        if (
            self.requests.get(tracked.request_id) is not tracked
            or worker.worker_id not in self.workers
        ):
            return  # cancelled, or the worker died, while we read Redis
        if len(outputs) >= tracked.submit.sampling.max_tokens:
            await self._complete(tracked, len(outputs))  # its last token went out before a crash
            return
        # Book the new holder before any await, so the old holder's answer to the abort below
        # reads as stale in _on_request_done.
        previous, tracked.previous_worker = tracked.previous_worker, None
        tracked.recovered, tracked.worker = False, worker.worker_id
        tracked.generated = max(tracked.generated, len(outputs))
        worker.holds.add(tracked.request_id)
        if previous is not None and previous != worker.worker_id:
            # After a restart or a drain the old holder may still keep its KV: free it.
            await self.bus.publish(
                self.subjects.worker_cmd(previous), AbortRequest(tracked.request_id)
            )
        kv, source = self._importable_kv(tracked, worker, len(outputs))
        if source is None:
            await self._free_kv(self._take_kv(tracked), tracked.request_id)
        s = tracked.submit
        self._end_queue_wait(tracked, worker.worker_id)
        traced = self._traces.get(s.request_id)
        # The worker keeps this context for the request's own spans (prefill, decode turns).
        await self.bus.publish(
            self.subjects.worker_cmd(worker.worker_id),
            AssignRequest(
                s.request_id, s.model, s.prompt_token_ids, s.sampling, s.gateway_id,
                s.arrival_time, outputs, kv, source,
            ),
            context=traced.context if traced is not None else NO_TRACE,
        )  # fmt: skip
        self._spawn(self.store.mark_running(tracked.request_id, worker.worker_id))

    def _importable_kv(
        self, tracked: TrackedRequest, worker: WorkerBook, outputs: int
    ) -> tuple[KVHandle | None, str | None]:
        """The exported KV the assignee can import (same node as its live source, covering
        prompt + outputs - 1 tokens), or (None, None): the worker re-prefills (or, when it is
        the source itself, still holds the KV)."""
        kv, source = tracked.kv, tracked.kv_source
        usable = (
            kv is not None
            and source is not None
            and source != worker.worker_id
            and self._same_node(source, worker.worker_id)
            and kv.num_tokens == len(tracked.submit.prompt_token_ids) + outputs - 1
        )
        return (kv, source) if usable else (None, None)  # the source frees it on KVImported

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

    # ================================================================== workers

    async def _on_heartbeat(self, beat: Heartbeat, _msg: Any) -> None:
        worker = self.workers.get(beat.worker_id)
        if worker is not None and beat.incarnation != worker.heartbeat.incarnation:
            # Restarted under the same id faster than the heartbeat timeout: the new process
            # holds none of the old one's requests.
            await self._retire(beat.worker_id, "restarted")
            worker = None
        if worker is None:
            if beat.draining or self.policy is None:
                return
            worker = self.workers[beat.worker_id] = WorkerBook(beat.worker_id, 0.0, beat)
            self._policy.add_instance(instance_view(beat))
            log.info("worker %s joined (%s, %s)", beat.worker_id, beat.role, beat.device)
        worker.last_seen, worker.heartbeat = time.monotonic(), beat
        view = self._policy.instances.get(beat.worker_id)
        if view is not None:
            refresh_view(view, beat)
        if self._turn_lost(worker, beat):
            log.warning("worker %s is idle but turn %s never reported: its TurnDone was lost",
                        worker.worker_id, worker.turn_id)  # fmt: skip
            self._end_turn(worker, TurnResult(steps=0, elapsed_s=0.0))
        if beat.draining and not worker.draining:
            worker.draining = True
            log.info("worker %s is draining", beat.worker_id)
            if worker.idle:
                await self._retire(worker.worker_id, "drained")
            return
        await self._dispatch()

    async def _check_workers(self) -> None:
        """Dead workers (silent too long) lose their requests to others; stuck turns end."""
        now = time.monotonic()
        for worker in list(self.workers.values()):
            if now - worker.last_seen > self.config.heartbeat_timeout_s:
                await self._retire(worker.worker_id, "silent (dead)")
            elif self._turn_overdue(worker, now):
                log.warning(
                    "turn %s on %s got no TurnDone: freeing it", worker.turn_id, worker.worker_id
                )
                self._end_turn(worker, TurnResult(steps=0, elapsed_s=0.0))
        await self._dispatch()

    def _turn_lost(self, worker: WorkerBook, beat: Heartbeat) -> bool:
        """The worker reports no turn (or another one) well after ours was sent."""
        if worker.turn is None or beat.turn_id == worker.turn_id:
            return False
        return time.monotonic() - worker.turn_sent_at > LOST_TURN_GRACE_S

    def _turn_overdue(self, worker: WorkerBook, now: float) -> bool:
        if worker.turn is None:
            return False
        return now - worker.turn_sent_at > self.config.turn_timeout_s + worker.turn.quota_s

    async def _retire(self, worker_id: str, why: str) -> None:
        """A worker is gone: its requests are re-run elsewhere, or end with an error."""
        worker = self.workers.pop(worker_id, None)
        if worker is None:
            return
        lost = self._policy.remove_instance(worker_id)
        self._flush_deferred_cancels()  # its turn in flight is gone with it
        lost_ids = {r.request_id for r in lost} | {
            rid for rid, t in self.requests.items() if t.worker == worker_id
        }
        log.warning("worker %s %s: %d requests to re-run", worker_id, why, len(lost_ids))
        for tracked in self.requests.values():
            if tracked.kv_source == worker_id and tracked.worker is None:
                tracked.kv, tracked.kv_source = None, None  # its KV died with it: re-prefill
        failed, freed = [], []
        for request_id in lost_ids:
            tracked = self.requests.pop(request_id, None)
            if tracked is None:
                continue
            if request_id in self._policy.requests:
                self._policy.cancel(request_id)  # in case the policy kept it elsewhere
            tracked.worker, tracked.recovered = None, True
            tracked.previous_worker = worker_id if why == "drained" else None
            freed.append((self._take_kv(tracked), request_id))  # re-run from Redis tokens
            rejection = self._check_resumable(tracked) or self._admit(tracked)
            if rejection is not None:
                failed.append((tracked, rejection.reason))
        for source, request_id in freed:
            await self._free_kv(source, request_id)
        for tracked, reason in failed:
            await self._fail(tracked, f"worker {worker_id} lost; {reason}")
        await self._dispatch()

    # ================================================================== worker events

    async def _on_event(self, event: Any, _msg: Any) -> None:
        if isinstance(event, TurnDone):
            await self._on_turn_done(event)
        elif isinstance(event, RequestDone):
            await self._on_request_done(event)
        elif isinstance(event, KVImported):
            await self._on_kv_imported(event)
        elif isinstance(event, WorkerError):
            await self._on_worker_error(event)
        # SwitchDone: observers (``aegaeon top``) read it; the policy learns via TurnDone.

    async def _on_turn_done(self, event: TurnDone) -> None:
        worker = self.workers.get(event.worker_id)
        if worker is None or worker.turn_id != event.turn_id:
            log.debug("stale TurnDone %d from %s", event.turn_id, event.worker_id)
            for request_id in event.exported:  # a hand-off we gave up on: free its KV there
                tracked = self.requests.get(request_id)
                if tracked is None or tracked.worker != event.worker_id:
                    await self._free_kv(event.worker_id, request_id)
            return
        for request_id, produced in event.progress.items():
            tracked = self.requests.get(request_id)
            if tracked is not None and tracked.worker == worker.worker_id:
                tracked.generated = max(tracked.generated, produced)
        result = TurnResult(
            steps=event.steps,
            elapsed_s=event.elapsed_s,
            switch_s=event.switch_s,
            finished=list(event.finished),
            generated={r: n for r, n in event.progress.items() if r in self.requests},
            step_times_s=step_times(event),
        )
        self._observe_switch(event)
        plan = self._end_turn(worker, result)
        await self._rerun_vanished(worker, plan, event)
        await self._hand_off(worker, plan, event)
        if worker.draining:
            await self._retire(worker.worker_id, "drained")
        await self._dispatch()

    async def _rerun_vanished(self, worker: WorkerBook, plan: TurnPlan, event: TurnDone) -> None:
        """Requests of the turn the worker no longer holds, yet never reported finished (their
        RequestDone was lost): re-run them from the tokens in Redis (or just finish them)."""
        for request_id in plan.request_ids:
            tracked = self.requests.get(request_id)
            if tracked is None or tracked.worker != worker.worker_id:
                continue
            if request_id in event.progress or request_id in event.finished:
                continue
            log.warning("request %s vanished from %s: re-running it", request_id, worker.worker_id)
            worker.holds.discard(request_id)
            self.requests.pop(request_id)
            if request_id in self._policy.requests:
                self._policy.cancel(request_id)
            tracked.worker, tracked.recovered = None, True
            await self._free_kv(self._take_kv(tracked), request_id)
            rejection = self._check_resumable(tracked) or self._admit(tracked)
            if rejection is not None:
                await self._fail(tracked, f"request lost on {worker.worker_id}; {rejection.reason}")

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

    def _observe_switch(self, event: TurnDone) -> None:
        """Feed the estimator the switch time the turn really waited (what prefetch left)."""
        observe = getattr(self.estimator, "observe_switch", None)
        if observe is not None and event.switch_bytes + event.prefetched_bytes > 0:
            observe(event.model, exposed_s=event.switch_s, copied_bytes=event.switch_bytes,
                    prefetched_bytes=event.prefetched_bytes)  # fmt: skip

    async def _hand_off(self, worker: WorkerBook, plan: TurnPlan, event: TurnDone) -> None:
        """Prefill → decode: the request leaves this worker and is assigned to the target anew,
        continuing from the tokens in Redis. With an exported KV handle (same node) the target
        imports the KV and this worker keeps its copy until KVImported; without one this
        worker frees it now and the target re-prefills from prompt + tokens."""
        for request_id, target in plan.handoff.items():
            tracked = self.requests.get(request_id)
            if tracked is None or tracked.worker != worker.worker_id or target == worker.worker_id:
                continue
            worker.holds.discard(request_id)
            tracked.worker, tracked.recovered = None, True
            handle = event.exported.get(request_id)
            if handle is not None:
                tracked.kv, tracked.kv_source = handle, worker.worker_id
                continue
            await self.bus.publish(
                self.subjects.worker_cmd(worker.worker_id), AbortRequest(request_id)
            )

    async def _on_kv_imported(self, event: KVImported) -> None:
        """The decode worker copied the KV (or gave up and re-prefills): the source frees it."""
        tracked = self.requests.get(event.request_id)
        if tracked is not None and tracked.kv_source == event.source_worker:
            await self._free_kv(self._take_kv(tracked), event.request_id)
        elif tracked is None or tracked.worker != event.source_worker:
            await self._free_kv(event.source_worker, event.request_id)  # already forgotten
        if not event.ok:
            log.warning("KV of %s from %s not imported on %s (re-prefilled): %s",
                        event.request_id, event.source_worker, event.worker_id, event.message)  # fmt: skip

    async def _on_request_done(self, event: RequestDone) -> None:
        tracked = self.requests.get(event.request_id)
        if tracked is None:
            return
        holder = tracked.worker or tracked.previous_worker
        if event.worker_id != holder or event.finish_reason == "abort":
            # An old holder confirming our abort (after a hand-off, a restart, a lost decode
            # worker): the request lives on elsewhere, possibly on that same worker again.
            return
        self._forget(tracked)
        await self.store.finish(event.request_id, event.finish_reason, event.num_output_tokens)

    async def _on_worker_error(self, event: WorkerError) -> None:
        log.warning("worker %s: %s", event.worker_id, event.message)
        worker = self.workers.get(event.worker_id)
        if worker is not None and event.turn_id is not None and worker.turn_id == event.turn_id:
            self._end_turn(worker, TurnResult(steps=0, elapsed_s=0.0))  # that turn is over
        tracked = self.requests.get(event.request_id or "")
        if tracked is not None:
            if tracked.worker:
                cmd = self.subjects.worker_cmd(tracked.worker)
                await self.bus.publish(cmd, AbortRequest(tracked.request_id))
            await self._fail(tracked, event.message)
        await self._dispatch()

    # ================================================================== ending requests

    def _forget(self, tracked: TrackedRequest) -> None:
        """Drop a request from the books and the policy (after the turn that holds it)."""
        self.requests.pop(tracked.request_id, None)
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

    async def _on_cancel(self, cancel: CancelRequest, _msg: Any) -> None:
        tracked = self.requests.get(cancel.request_id)
        if tracked is None:
            return
        holders = {tracked.worker, tracked.previous_worker} - {None}
        self._forget(tracked)
        for worker_id in holders:
            assert worker_id is not None
            await self.bus.publish(
                self.subjects.worker_cmd(worker_id), AbortRequest(cancel.request_id)
            )
        await self.store.finish(cancel.request_id, "abort", tracked.generated)
        await self._dispatch()

    # ================================================================== observers

    def state(self) -> SchedulerState:
        """A snapshot for ``aegaeon top`` and the gateway's /health."""
        queued, running = counts_by_model(self.requests)
        workers = [worker_state(w) for w in self.workers.values()]
        alpha = getattr(self.policy, "last_alpha", None)
        return SchedulerState(
            time=time.time(),
            policy=self.config.policy,
            workers=workers,
            queued=queued,
            running=running,
            alpha=float(alpha) if alpha is not None else None,
        )

    async def _publish_state(self) -> None:
        state = self.state()
        await self.bus.publish(self.subjects.scheduler_state, state)
        for model in self.models:
            metrics.NUM_REQUESTS_WAITING.labels(model).set(state.queued.get(model, 0))
            metrics.NUM_REQUESTS_RUNNING.labels(model).set(state.running.get(model, 0))
        if state.alpha is not None:
            metrics.ROUND_ALPHA.set(state.alpha)
