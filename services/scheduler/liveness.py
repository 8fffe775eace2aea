"""Worker liveness and recovery: heartbeats add workers to the policy; a silent, restarted or
drained worker is retired and its requests re-run elsewhere from the tokens in Redis; a turn
whose TurnDone was lost (or never comes) is ended so the worker gets the next one. The
model-stores' heartbeats say what each node caches: the policy's locality hint while any store
is heard (``locality.py``), none otherwise."""

from __future__ import annotations

import logging
import time
from typing import Any

from aegaeon.scheduler.books import TrackedRequest, WorkerBook, instance_view, refresh_view
from aegaeon.scheduler.core import ServiceCore
from aegaeon.scheduler.policies.base import TurnResult

from aegaeon.protocol import Heartbeat, StoreHeartbeat

log = logging.getLogger(__name__)

LOST_TURN_GRACE_S = 3.0
"""How long after sending a turn a worker may still report no turn before it counts as lost
(the RunTurn may wait behind other commands)."""


class Liveness(ServiceCore):
    """Heartbeats, silent workers, lost and overdue turns."""

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

    async def _on_store_heartbeat(self, beat: StoreHeartbeat, _msg: Any) -> None:
        if beat.store_id not in self.node_caches.stores:
            log.info("model-store %s on node %s: %d models cached",
                     beat.store_id, beat.node, len(beat.cached))  # fmt: skip
        self.node_caches.heard(beat, time.monotonic())
        self._set_locality()

    def _set_locality(self) -> None:
        """The policy weighs where weights are only while some store says what it caches."""
        if self.policy is None:
            return
        locality = self.node_caches if self.node_caches.known else None
        if (locality is None) != (self.policy.locality is None):
            log.info("locality-aware placement %s", "on" if locality is not None else "off")
        self.policy.locality = locality

    async def _check_workers(self) -> None:
        """Dead workers (silent too long) lose their requests to others; stuck turns end;
        silent model-stores' caches are forgotten."""
        now = time.monotonic()
        for store_id in self.node_caches.expire(now):
            log.warning("model-store %s silent: forgetting what it caches", store_id)
        self._set_locality()
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
        for waiting in self.requests.values():
            if waiting.kv_source == worker_id and waiting.worker is None:
                waiting.kv, waiting.kv_source = None, None  # its KV died with it: re-prefill
        failed: list[tuple[TrackedRequest, str]] = []
        freed: list[tuple[str | None, str]] = []
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
