"""The scheduler service: a thin NATS + Redis shell around a pure :class:`Policy`.

Every handler changes the policy and the books in one synchronous block (no ``await`` inside),
then does its I/O; asyncio runs one coroutine at a time, so the state is never seen half-done::

    requests.submit ──► validate ─► persist (Redis queue) ─► policy.submit ─► reply ─┐
    worker.heartbeat ─► instance joins / stays alive ───────────────────────────────┤
    worker.*.events ──► TurnDone → policy.turn_done; RequestDone → forget ──────────┼─► dispatch:
    requests.cancel ──► policy.cancel, AbortRequest to the holder ──────────────────┤   idle worker →
    every 0.25 s ─────► dead workers → re-run their requests elsewhere; stuck turns ┘   next_turn →
                                                                                         Assign…, RunTurn
    registry.changed ─► a model's lifecycle state (not ready: its new requests are refused)
    models.heartbeat ─► what each node's host cache holds: the policy's locality hint
    scheduler.unload ─► nothing of a drained model left? refuse it, EvictModel to every worker
    every 0.25 s ─────► a model idle past its keep-alive: EvictModel to every worker, EvictIdle
                        to every model-store (models.evict)

One concern per module: ``models`` (the registry, lifecycle states, unloading a drained model),
``admission`` (submit, resume, cancel), ``dispatch`` (turns and assignments out), ``turns``
(worker events in, the prefill → decode KV hand-off), ``liveness`` (heartbeats, recovery);
``core`` holds the books they share and ends requests; ``locality`` what each node caches;
``keep_alive`` evicts models idle past their keep-alive.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from aegaeon.scheduler.admission import Admission
from aegaeon.scheduler.books import counts_by_model, worker_state
from aegaeon.scheduler.core import EstimatorFactory, SchedulerConfig
from aegaeon.scheduler.dispatch import Dispatch
from aegaeon.scheduler.keep_alive import KeepAlive
from aegaeon.scheduler.liveness import Liveness
from aegaeon.scheduler.policies import make_policy
from aegaeon.scheduler.store import UNWRITTEN_RETRY_S
from aegaeon.scheduler.turns import TurnEvents

from aegaeon import metrics
from aegaeon.protocol import (
    CancelRequest,
    Heartbeat,
    ModelChanged,
    SchedulerState,
    StoreHeartbeat,
    SubmitRequest,
    UnloadModel,
    WorkerEvent,
)

log = logging.getLogger(__name__)

__all__ = ["EstimatorFactory", "SchedulerConfig", "SchedulerService"]


class SchedulerService(Admission, Dispatch, TurnEvents, Liveness, KeepAlive):
    """The control plane. Build it, then ``await run(stop_event)``."""

    # ================================================================== life cycle

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set, then drain the subscriptions."""
        await self._load_models(wait_s=self.config.models_wait_s)
        estimator = self.estimator_factory(dict(self.models)) if self.estimator_factory else None
        self.policy = make_policy(
            self.config.policy, dict(self.models), self.config.slo, estimator,
            **self.config.policy_options,
        )  # fmt: skip
        self.policy.max_wait_s = self.config.max_wait_s
        self.estimator = estimator if estimator is not None else getattr(self.policy, "est", None)
        subs = [
            await self.bus.subscribe(self.subjects.heartbeat, Heartbeat, self._on_heartbeat),
            await self.bus.subscribe(self.subjects.all_worker_events, WorkerEvent, self._on_event),
            await self.bus.subscribe(self.subjects.submit, SubmitRequest, self._on_submit),
            await self.bus.subscribe(self.subjects.cancel, CancelRequest, self._on_cancel),
            await self.bus.subscribe(
                self.subjects.registry_changed, ModelChanged, self._on_model_changed
            ),
            await self.bus.subscribe(self.subjects.unload_model, UnloadModel, self._on_unload),
            await self.bus.subscribe(
                self.subjects.store_heartbeat, StoreHeartbeat, self._on_store_heartbeat
            ),
        ]
        loops = [
            self._every(self.config.check_interval_s, self._check_workers),
            self._every(self.config.check_interval_s, self._evict_idle_models),
            self._every(self.config.state_interval_s, self._publish_state),
            self._every(self.config.models_refresh_s, self._load_models),
            self._every(UNWRITTEN_RETRY_S, self.store.write_unwritten),
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
            cached=self.node_caches.by_node(),
        )

    async def _publish_state(self) -> None:
        state = self.state()
        await self.bus.publish(self.subjects.scheduler_state, state)
        await self._report_positions()
        for model in self.models:
            metrics.NUM_REQUESTS_WAITING.labels(model).set(state.queued.get(model, 0))
            metrics.NUM_REQUESTS_RUNNING.labels(model).set(state.running.get(model, 0))
        if state.alpha is not None:
            metrics.ROUND_ALPHA.set(state.alpha)
