"""Dispatch: each idle worker's next turn from the policy, sent as AssignRequests (a request
new to that worker, with an exported KV handle when a prefill worker on its node left one)
and a RunTurn (naming the requests whose KV the prefill worker must export); then a
PrefetchModel to each busy worker whose next switch changed since its turn was planned, and to
each worker left idle that the policy has stage a model for the next arrival."""

from __future__ import annotations

import time

from aegaeon.scheduler.books import TrackedRequest, WorkerBook
from aegaeon.scheduler.core import ServiceCore
from aegaeon.scheduler.policies.base import TurnPlan
from opentelemetry import trace

from aegaeon import metrics
from aegaeon.protocol import (
    AbortRequest,
    AssignRequest,
    KVHandle,
    PrefetchHint,
    PrefetchModel,
    RunTurn,
)
from aegaeon.telemetry import NO_TRACE, record_span, tracer

_tracer = tracer(__name__)


class Dispatch(ServiceCore):
    """Idle workers get turns; requests reach workers (with the KV a hand-off left)."""

    async def _dispatch(self) -> None:
        """Give every idle worker its next turn."""
        if self.policy is None:
            return
        for plan in self._plan_idle():
            await self._send_turn(plan)
        for worker_id, model in self._restage():
            await self.bus.publish(self.subjects.worker_cmd(worker_id), PrefetchModel(model))
            await self.bus.publish(self.subjects.models("prefetch"), PrefetchHint(model))

    def _restage(self) -> list[tuple[str, str]]:
        """(worker, model) for each busy worker whose next switch changed since its turn was
        planned (a request of another model arrived): it stages that model now, so the copy
        overlaps the rest of the running turn; and for each worker left idle with nothing to
        run that should stage a model for the next arrival (synchronous)."""
        staged = []
        for worker in self._live_workers():
            model = self._policy.prefetch_now(worker.worker_id)
            if model is not None:
                staged.append((worker.worker_id, model))
        return staged

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
            drop_kv=list(plan.drop_kv),
            pinned=plan.pinned,
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
        those whose target can reach it — on the same node, or anywhere when the prefill worker
        serves KV over the network (elsewhere the target re-prefills)."""
        return [
            request_id
            for request_id, target in plan.handoff.items()
            if target != worker_id and self._can_fetch_kv(worker_id, target)
        ]

    def _same_node(self, a: str, b: str) -> bool:
        """Both workers heartbeat the same (named) node: they share its memory."""
        first, second = self.workers.get(a), self.workers.get(b)
        if first is None or second is None:
            return False
        return bool(first.heartbeat.node) and first.heartbeat.node == second.heartbeat.node

    def _can_fetch_kv(self, source: str, target: str) -> bool:
        """``target`` can copy KV that ``source`` exports: it maps the pool file on the same
        node, or fetches it from ``source``'s KV transfer server."""
        book = self.workers.get(source)
        serves = book is not None and bool(book.heartbeat.kv_endpoint)
        return target in self.workers and (serves or self._same_node(source, target))

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
        """The exported KV the assignee can import (from its live source, on its node or over
        the network, covering prompt + outputs - 1 tokens), or (None, None): the worker
        re-prefills (or, when it is the source itself, still holds the KV)."""
        kv, source = tracked.kv, tracked.kv_source
        usable = (
            kv is not None
            and source is not None
            and source != worker.worker_id
            and (self._same_node(source, worker.worker_id) or bool(kv.endpoint))
            and source in self.workers
            and kv.num_tokens == len(tracked.submit.prompt_token_ids) + outputs - 1
        )
        return (kv, source) if usable else (None, None)  # the source frees it on KVImported
