"""Idle eviction: a model with nothing queued or running for its keep-alive (``aegaeon.serving``)
leaves every worker's weight slots and every node's host cache, so an idle model of a market
gives its device slot, its page-locked mapping and its shared memory back.

The scheduler is the one judge of idleness: it sees every request of every model, where a
model-store sees only the loads workers ask of it (a model resident and busy for an hour asks
none). When a model's idle spell passes its keep-alive, the scheduler sends ``EvictModel`` to
every worker (one not holding it forgets nothing it needs; one still holding requests of it keeps
it) and ``EvictIdle`` to every model-store (a store keeps a model a worker's lease holds). A pinned
model is never evicted for idling: the pin says keep it. The next request of an evicted model
loads it again, as any cold request does.

``IdleClock`` is the pure part; ``KeepAlive`` is the service's periodic job around it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aegaeon.scheduler.books import counts_by_model
from aegaeon.scheduler.core import ServiceCore

from aegaeon.protocol import EvictIdle, EvictModel

log = logging.getLogger(__name__)


@dataclass
class IdleClock:
    """When each model was last busy, and which idle spells were already acted on. Pure."""

    last_busy: dict[str, float] = field(default_factory=dict)
    evicted: set[str] = field(default_factory=set)

    def due(self, now: float, busy: Iterable[str], keep_alive_s: Mapping[str, float]) -> list[str]:
        """The models whose idle spell just passed their keep-alive (> 0), once per spell.

        A busy model's spell starts again; a model first seen idle starts its spell now (a
        restarted scheduler does not evict everything at once). Models without a keep-alive are
        forgotten, so the clock holds no more than the models that have one.
        """
        busy = set(busy)
        for name in [m for m in self.last_busy if keep_alive_s.get(m, 0.0) <= 0]:
            del self.last_busy[name]
            self.evicted.discard(name)
        due = []
        for name, keep in keep_alive_s.items():
            if keep <= 0:
                continue
            if name in busy:
                self.last_busy[name] = now
                self.evicted.discard(name)
                continue
            since = self.last_busy.setdefault(name, now)
            if name not in self.evicted and now - since >= keep:
                self.evicted.add(name)
                due.append(name)
        return due


class KeepAlive(ServiceCore):
    """The scheduler's side of keep-alive: run ``_evict_idle_models`` every check interval."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.idle_clock = IdleClock()

    async def _evict_idle_models(self) -> None:
        queued, running = counts_by_model(self.requests)
        busy = {*queued, *running}
        busy |= {w.turn.model for w in self.workers.values() if w.turn is not None}
        pinned = {name for name, spec in self.models.items() if spec.pin > 0}
        keep = {name: s for name, s in self.keep_alive_s.items() if name not in pinned}
        for name in self.idle_clock.due(time.monotonic(), busy, keep):
            workers = sorted(self.workers)
            for worker_id in workers:
                await self.bus.publish(self.subjects.worker_cmd(worker_id), EvictModel(name))
            if self.policy is not None:  # its next turn anywhere pays a switch: plan for one
                self.policy.weights_evicted(name)
            await self.bus.publish(self.subjects.models("evict"), EvictIdle(name))
            log.info("%s idle for %.0f s (its keep-alive): evicted from %d workers and the host "
                     "caches", name, keep[name], len(workers))  # fmt: skip
