"""What the gateway knows of the rest of the system: the model registry (from the model-store,
cached a few seconds) and liveness and residency (from worker heartbeats and scheduler state).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from nats.aio.msg import Msg

from aegaeon.bus import Bus
from aegaeon.protocol import Heartbeat, ListModels, ModelInfo, ModelList, SchedulerState

FRESH_S = 5.0
"""A heartbeat or scheduler state older than this means that part is gone."""


class ModelDirectory:
    """The registered models, asked of the model-store at most once per ``ttl_s``."""

    def __init__(self, bus: Bus, ttl_s: float = 2.0, timeout_s: float = 5.0) -> None:
        self.bus = bus
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self._models: dict[str, ModelInfo] = {}
        self._fetched = float("-inf")
        self._lock = asyncio.Lock()

    async def all(self) -> list[ModelInfo]:
        """Every registered model. Raises TimeoutError / NoRespondersError when the store is
        not reachable and nothing was ever fetched."""
        async with self._lock:
            if time.monotonic() - self._fetched > self.ttl_s:
                await self._refresh()
        return list(self._models.values())

    async def get(self, name: str) -> ModelInfo | None:
        models = await self.all()
        found = next((m for m in models if m.name == name), None)
        if found is None and time.monotonic() - self._fetched > 0.2:
            # A model registered a moment ago must not wait out the TTL to be found.
            async with self._lock:
                await self._refresh()
            found = self._models.get(name)
        return found

    async def _refresh(self) -> None:
        try:
            reply = await self.bus.request(
                self.bus.subjects.models("list"), ListModels(), ModelList, self.timeout_s
            )
        except Exception:
            if self._fetched == float("-inf"):
                raise
            return  # keep serving the last known registry through a store restart
        self._models = {m.name: m for m in reply.models}
        self._fetched = time.monotonic()


@dataclass
class ClusterView:
    """Liveness and residency, from ``worker.heartbeat`` and ``scheduler.state``."""

    heartbeats: dict[str, tuple[float, Heartbeat]] = field(default_factory=dict)
    scheduler: tuple[float, SchedulerState] | None = None
    _subscriptions: list = field(default_factory=list)

    async def start(self, bus: Bus) -> None:
        self._subscriptions = [
            await bus.subscribe(bus.subjects.heartbeat, Heartbeat, self.on_heartbeat),
            await bus.subscribe(bus.subjects.scheduler_state, SchedulerState, self.on_state),
        ]

    async def stop(self) -> None:
        for subscription in self._subscriptions:
            await subscription.unsubscribe()
        self._subscriptions = []

    async def on_heartbeat(self, beat: Heartbeat, _msg: Msg) -> None:
        self.heartbeats[beat.worker_id] = (time.monotonic(), beat)

    async def on_state(self, state: SchedulerState, _msg: Msg) -> None:
        self.scheduler = (time.monotonic(), state)

    def live_workers(self) -> list[Heartbeat]:
        now = time.monotonic()
        return [b for seen, b in self.heartbeats.values() if now - seen <= FRESH_S]

    def scheduler_alive(self) -> bool:
        return self.scheduler is not None and time.monotonic() - self.scheduler[0] <= FRESH_S

    def residency(self) -> dict[str, list[str]]:
        """model → workers it is resident on, from both sources."""
        where: dict[str, set[str]] = {}
        for beat in self.live_workers():
            if beat.resident_model:
                where.setdefault(beat.resident_model, set()).add(beat.worker_id)
        if self.scheduler_alive():
            assert self.scheduler is not None
            for worker in self.scheduler[1].workers:
                if worker.resident_model:
                    where.setdefault(worker.resident_model, set()).add(worker.worker_id)
        return {model: sorted(workers) for model, workers in where.items()}
