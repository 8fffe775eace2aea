"""Turn bookkeeping from the workers' events: TurnDone (the policy learns, vanished requests
re-run, prefill → decode hand-off, the measured switch time to the estimator), KVImported (the
source frees its copy), RequestDone, WorkerError::

    prefill worker p ── TurnDone(exported: r → handle) ──► r.kv = handle, p keeps the KV
    dispatch ── AssignRequest(r, kv, kv_source=p) ──► decode worker d imports it
    d ── KVImported(r, ok) ──► AbortRequest(r) to p: its host copy is freed
"""

from __future__ import annotations

import logging
import time
from typing import Any

from aegaeon.scheduler.books import WorkerBook
from aegaeon.scheduler.core import ServiceCore
from aegaeon.scheduler.estimators import observe_turn
from aegaeon.scheduler.policies.base import TurnPlan, TurnResult

from aegaeon.protocol import AbortRequest, KVImported, RequestDone, TurnDone, WorkerError

log = logging.getLogger(__name__)


class TurnEvents(ServiceCore):
    """What workers report: turns ended, requests ended, KV imported, errors."""

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
        await self._abort_orphans(worker.worker_id, event)
        plan = worker.turn
        assert plan is not None  # the turn this TurnDone answers (checked above)
        result = TurnResult(
            steps=event.steps,
            elapsed_s=event.elapsed_s,
            switch_s=event.switch_s,
            finished=list(event.finished),
            generated={r: n for r, n in event.progress.items() if r in self.requests},
            # The worker times its first step apart (a prefill, or new members' prefill with
            # the first decode) from the rest (pure decode steps).
            prefill_s=event.prefill_s if plan.prefill_only else 0.0,
            decode_steps=max(0, event.steps - 1),
            decode_s=event.decode_s,
        )
        self._observe_switch(event)
        # Before the policy moves the requests' contexts on; the round trip is sent →
        # answered, less the worker's own time.
        round_trip = time.monotonic() - worker.turn_sent_at - event.elapsed_s
        observe_turn(self.estimator, plan, self._policy.requests, result, round_trip)
        self._end_turn(worker, result)
        await self._rerun_vanished(worker, plan, event)
        await self._hand_off(worker, plan, event)
        if worker.draining:
            await self._retire(worker.worker_id, "drained")
        await self._dispatch()

    async def _abort_orphans(self, worker_id: str, event: TurnDone) -> None:
        """The worker lists every request it holds: abort those these books do not place there
        (nor as a previous holder or a KV hand-off's source). Their abort was lost with a NATS
        server, or they ended while moving: otherwise they would keep KV there for nobody."""
        for request_id in event.progress:
            tracked = self.requests.get(request_id)
            if tracked is None or worker_id not in (
                tracked.worker,
                tracked.previous_worker,
                tracked.kv_source,
            ):
                log.info("%s still holds %s, which runs elsewhere or ended: abort", worker_id, request_id)  # fmt: skip
                await self.bus.publish(
                    self.subjects.worker_cmd(worker_id), AbortRequest(request_id)
                )

    def _observe_switch(self, event: TurnDone) -> None:
        """Feed the estimator the switch time the turn really waited (what prefetch left)."""
        observe = getattr(self.estimator, "observe_switch", None)
        if observe is not None and event.switch_bytes + event.prefetched_bytes > 0:
            observe(event.model, exposed_s=event.switch_s, copied_bytes=event.switch_bytes,
                    prefetched_bytes=event.prefetched_bytes)  # fmt: skip

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
            # The cause (exception text) stays in the scheduler's log above.
            await self._fail(tracked, "the worker failed on this request")
        await self._dispatch()
