"""Admission and resume: a submitted request is checked, persisted in Redis and handed to the
policy; at start the queue a previous scheduler left in Redis is re-admitted; a cancel ends a
request wherever it is."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aegaeon.scheduler.books import TrackedRequest, waiting_ahead, waiting_positions
from aegaeon.scheduler.models import ModelRegistry

from aegaeon.bus import context_from
from aegaeon.capacity import largest_slot, too_large
from aegaeon.protocol import (
    AbortRequest,
    CancelRequest,
    RequestStatus,
    SubmitReply,
    SubmitRequest,
    status_batches,
)
from aegaeon.telemetry import RequestTrace, tracer

log = logging.getLogger(__name__)
_tracer = tracer(__name__)


class Admission(ModelRegistry):
    """Requests in: admission checks (the model registry and its lifecycle states are
    ``models.py``'s), the Redis queue of a previous run, cancels."""

    async def _on_submit(self, request: SubmitRequest, msg: Any) -> None:
        # A child of the gateway's span: the request's trace shows its admission here.
        with _tracer.start_as_current_span("scheduler.submit", context=context_from(msg)) as span:
            span.set_attribute("aegaeon.request_id", request.request_id)
            span.set_attribute("aegaeon.model", request.model)
            await self._submit(request, msg)

    async def _submit(self, request: SubmitRequest, msg: Any) -> None:
        if request.request_id in self.requests or request.request_id in self.ended:
            # The same submit again: a gateway sends it once more when its bus connection comes
            # back while it waits for the answer (which may have been lost). It runs once; one
            # that ended under an earlier scheduler is caught by the persist below (or, when
            # the checks would refuse it now, by the read that follows a refusal).
            await self.bus.reply(msg, self._accepted(request.request_id))
            return
        if request.model not in self.models or self._loading(request.model):
            await self._load_models()  # registered or ready a moment ago (a change not heard)
        await self._wait_for_a_worker()
        if request.request_id in self.cancelled_unseen:  # its gateway gave up meanwhile
            await self.bus.reply(msg, SubmitReply(False, "cancelled before it was admitted", 409))
            return
        rejection = self._check_admission(request)
        if rejection is not None and await self.store.has_ended(request.request_id):
            await self.bus.reply(msg, self._accepted(request.request_id))  # not an error: it ran
            return
        if rejection is None and request.request_id not in self.requests:
            if not await self.store.persist(request):  # it ended already: do not run it again
                await self.bus.reply(msg, self._accepted(request.request_id))
                return
            rejection = self._admit(TrackedRequest(request))
            if rejection is not None:
                await self.store.forget_queued(request.request_id)
            else:
                self._traces[request.request_id] = RequestTrace(context_from(msg))
        await self.bus.reply(msg, rejection or self._accepted(request.request_id))
        await self._dispatch()

    def _accepted(self, request_id: str) -> SubmitReply:
        tracked = self.requests.get(request_id)
        if tracked is None:  # it has ended: its gateway has the end or reads it from Redis
            return SubmitReply(accepted=True)
        position = tracked.reported_position = waiting_ahead(self.requests, tracked)
        return SubmitReply(accepted=True, queued_ahead=position)

    async def _report_positions(self) -> None:
        """Tell each gateway where its requests still waiting for a first token now stand in the
        queue (only those whose place changed since they were last told): their streams show it."""
        moved = []
        for request_id, position in waiting_positions(self.requests).items():
            tracked = self.requests[request_id]
            if tracked.reported_position != position:
                tracked.reported_position = position
                status = RequestStatus("queued", position=position, model=tracked.submit.model)
                moved.append((request_id, tracked.submit.gateway_id, status))
        for gateway_id, batch in status_batches(moved).items():
            await self.bus.publish(self.subjects.tokens(gateway_id), batch)

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
        refusal = self._model_refusal(request.model)  # loading, draining, failed
        if refusal is not None:
            return SubmitReply(False, refusal.message, refusal.status, refusal.retry_after)
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
        largest = max(largest_slot(w.heartbeat) for w in self._live_workers())
        if largest and spec.weight_bytes > largest:
            return SubmitReply(False, too_large(request.model, spec.weight_bytes, largest), 400)
        waiting = sum(1 for r in self.requests.values() if not r.started)
        if waiting >= self.config.max_queue:
            return SubmitReply(False, "scheduler queue is full", 503, self.config.retry_after_s)
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

    async def _on_cancel(self, cancel: CancelRequest, _msg: Any) -> None:
        tracked = self.requests.get(cancel.request_id)
        if tracked is None:
            if cancel.request_id not in self.ended:
                self.cancelled_unseen.add(cancel.request_id)
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
