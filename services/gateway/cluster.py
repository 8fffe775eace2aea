"""What the gateway knows of the rest of the system: the model registry (from the model-store,
cached a few seconds and updated at once by its ``registry.changed`` news: lifecycle states
included), liveness and residency (from worker heartbeats and scheduler state), and
the recent switches, preemptions and hand-offs (from worker events) for the runtime view.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from nats.aio.msg import Msg

from aegaeon.bus import Bus
from aegaeon.protocol import (
    Heartbeat,
    ListModels,
    ModelChanged,
    ModelInfo,
    ModelList,
    SchedulerState,
    WorkerEvent,
)
from aegaeon.runtime_view import RECENT_EVENTS, event_record, runtime_document

FRESH_S = 5.0
"""A heartbeat or scheduler state older than this means that part is gone."""


class ModelDirectory:
    """The registered models, asked of the model-store at most once per ``ttl_s``; a lifecycle
    move (``registry.changed``, or this gateway's own admin call) applies at once."""

    def __init__(
        self, bus: Bus, ttl_s: float = 2.0, timeout_s: float = 5.0,
        on_removed: Callable[[str], None] | None = None,
    ) -> None:  # fmt: skip
        self.bus = bus
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self.on_removed = on_removed  # what else forgets a removed model (its tokenizer)
        self._models: dict[str, ModelInfo] = {}
        self._fetched = float("-inf")
        self._lock = asyncio.Lock()
        self._subscription: Any = None

    async def watch(self) -> None:
        """Follow the model-store's lifecycle news."""
        self._subscription = await self.bus.subscribe(
            self.bus.subjects.registry_changed, ModelChanged, self._on_changed
        )

    async def stop(self) -> None:
        if self._subscription is not None:
            await self._subscription.unsubscribe()
            self._subscription = None

    async def _on_changed(self, change: ModelChanged, _msg: Msg) -> None:
        if change.removed:
            self.forget(change.model.name)
        else:
            self.apply(change.model)

    def apply(self, info: ModelInfo) -> None:
        """``info`` as it is now (a deploy, drain or class set answered, or announced)."""
        self._models[info.name] = info

    def forget(self, name: str) -> None:
        """A removed model: its requests are unknown from now on."""
        self._models.pop(name, None)
        if self.on_removed is not None:
            self.on_removed(name)

    async def all(self) -> list[ModelInfo]:
        """Every registered model. Raises TimeoutError / NoRespondersError when the store is
        not reachable and nothing was ever fetched."""
        async with self._lock:
            if time.monotonic() - self._fetched > self.ttl_s:
                await self._refresh()
        return list(self._models.values())

    async def known(self, timeout_s: float = 0.5) -> bool:
        """Whether this gateway can resolve models: the registry was fetched once (a later store
        outage serves the last list), or is fetched now within ``timeout_s`` (a probe's time)."""
        if self._fetched != float("-inf"):
            return True
        try:
            async with self._lock:
                await self._refresh(timeout_s)
        except Exception:
            return False
        return True

    async def get(self, name: str) -> ModelInfo | None:
        models = await self.all()
        found = next((m for m in models if m.name == name), None)
        if found is None and time.monotonic() - self._fetched > 0.2:
            # A model registered a moment ago must not wait out the TTL to be found.
            async with self._lock:
                await self._refresh()
            found = self._models.get(name)
        return found

    async def _refresh(self, timeout_s: float | None = None) -> None:
        try:
            reply = await self.bus.request(
                self.bus.subjects.models("list"), ListModels(), ModelList,
                timeout_s or self.timeout_s,
            )  # fmt: skip
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
    recent: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=RECENT_EVENTS))
    watchers: set[asyncio.Queue[dict[str, Any]]] = field(default_factory=set)  # event streams
    _subscriptions: list = field(default_factory=list)

    async def start(self, bus: Bus) -> None:
        self._subscriptions = [
            await bus.subscribe(bus.subjects.heartbeat, Heartbeat, self.on_heartbeat),
            await bus.subscribe(bus.subjects.scheduler_state, SchedulerState, self.on_state),
            await bus.subscribe(bus.subjects.all_worker_events, WorkerEvent, self.on_event),
        ]

    async def stop(self) -> None:
        for subscription in self._subscriptions:
            await subscription.unsubscribe()
        self._subscriptions = []

    async def on_heartbeat(self, beat: Heartbeat, _msg: Msg) -> None:
        self.heartbeats[beat.worker_id] = (time.monotonic(), beat)

    async def on_state(self, state: SchedulerState, _msg: Msg) -> None:
        self.scheduler = (time.monotonic(), state)

    async def on_event(self, event: WorkerEvent, _msg: Msg) -> None:
        record = event_record(event, time.time())
        if record is None:
            return
        self.recent.append(record)
        for queue in list(self.watchers):
            if queue.qsize() < RECENT_EVENTS:  # a stream that stopped reading misses events
                queue.put_nowait(record)

    def runtime(
        self, visible: Callable[[str], bool], registry: Iterable[ModelInfo] = ()
    ) -> dict[str, Any]:
        """The runtime view (``aegaeon.runtime_view``) from what was heard lately and the
        registered models, of the models ``visible`` says the viewer may see."""
        state = self.scheduler[1] if self.scheduler_alive() and self.scheduler else None
        return runtime_document(
            self.live_workers(), state, self.recent, time.time(), visible, registry
        )

    def live_workers(self) -> list[Heartbeat]:
        now = time.monotonic()
        for worker_id in [w for w, (seen, _) in self.heartbeats.items() if now - seen > FRESH_S]:
            del self.heartbeats[worker_id]  # gone (a restarted worker may come back under a new id)
        return [beat for _, beat in self.heartbeats.values()]

    def scheduler_alive(self) -> bool:
        return self.scheduler is not None and time.monotonic() - self.scheduler[0] <= FRESH_S

    def queues(self) -> tuple[dict[str, int], dict[str, int]]:
        """(model → requests waiting for a first token, model → decoding), from the scheduler's
        last state; empty when no live scheduler has said."""
        if not self.scheduler_alive():
            return {}, {}
        assert self.scheduler is not None
        return self.scheduler[1].queued, self.scheduler[1].running

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
