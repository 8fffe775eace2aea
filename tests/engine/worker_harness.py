"""A real ``WorkerService`` over real NATS and Redis, driven by hand: commands go in, its events
and token batches come back. Only the model-store's "ensure cached" answer is faked (it points
at the demo files)."""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from aegaeon.gpu_worker.engine import Engine
from aegaeon.gpu_worker.worker import WorkerService

from aegaeon.bus import Bus
from aegaeon.config import BusConfig
from aegaeon.protocol import (
    EnsureCached,
    Heartbeat,
    ModelInfo,
    ModelReply,
    TokenBatch,
    TokenEvent,
    TurnDone,
    WorkerError,
    WorkerEvent,
)

WORKER, GATEWAY = "w1", "g1"


class WorkerHarness:
    """``async with WorkerHarness(engine, models, nats_url, redis_url) as w``: ``w.send(cmd)``,
    ``await w.turn_ended()``; ``w.events`` (every worker event), ``w.tokens`` (request → token
    ids) and ``w.token_events`` (request → its TokenEvents) fill as they arrive."""

    def __init__(
        self, engine: Engine, models: Path, nats_url: str, redis_url: str,
        store_id: str | None = None, local_store: str | None = None,
    ) -> None:  # fmt: skip
        """``store_id``: the worker's model-store id; ``local_store``: the id of a store that
        answers on its node-local subject too (beside the shared one)."""
        self.engine, self.models = engine, models
        self.store_id, self.local_store = store_id, local_store
        self.ensured: list[str] = []  # the subject of each ensure the worker sent
        self.config = BusConfig(nats_url=nats_url, redis_url=redis_url,
                                prefix="wh" + uuid.uuid4().hex[:8])  # fmt: skip
        self.events: list[Any] = []
        self.tokens: dict[str, list[int]] = defaultdict(list)
        self.token_events: dict[str, list[TokenEvent]] = defaultdict(list)
        self._turns = asyncio.Queue[TurnDone | WorkerError]()

    async def __aenter__(self) -> WorkerHarness:
        self.bus = bus = await Bus.connect(self.config, name="test-worker-harness")
        self.redis = aioredis.Redis.from_url(self.config.redis_url)
        self.worker = WorkerService(WORKER, "both", self.engine, bus, self.redis, self.store_id)
        ready = asyncio.Event()  # the worker's first heartbeat follows its command subscription

        async def ensure(request: EnsureCached, msg: Any) -> None:
            self.ensured.append(msg.subject)
            folder = self.models / request.name
            info = ModelInfo(request.name, "", "", str(folder), 0, 0, 0, "float32",
                             cached=True, cache_path=str(folder / "model.safetensors"))  # fmt: skip
            await bus.reply(msg, ModelReply(info))

        async def on_event(event: Any, _msg: Any) -> None:
            self.events.append(event)
            if isinstance(event, TurnDone | WorkerError):
                await self._turns.put(event)

        async def on_heartbeat(_beat: Heartbeat, _msg: Any) -> None:
            ready.set()

        async def on_tokens(batch: TokenBatch, _msg: Any) -> None:
            for event in batch.events:
                self.tokens[event.request_id] += event.token_ids
                self.token_events[event.request_id].append(event)

        self.subs = [
            await bus.subscribe(bus.subjects.models("ensure"), EnsureCached, ensure),
            *(
                [
                    await bus.subscribe(
                        bus.subjects.models(f"ensure.{self.local_store}"), EnsureCached, ensure
                    )
                ]
                if self.local_store
                else []
            ),
            await bus.subscribe(bus.subjects.worker_events(WORKER), WorkerEvent, on_event),
            await bus.subscribe(bus.subjects.tokens(GATEWAY), TokenBatch, on_tokens),
            await bus.subscribe(bus.subjects.heartbeat, Heartbeat, on_heartbeat),
        ]
        self.running = asyncio.create_task(self.worker.run())
        await asyncio.wait_for(ready.wait(), 60)
        return self

    async def send(self, command: Any) -> None:
        await self.bus.publish(self.bus.subjects.worker_cmd(WORKER), command)

    async def turn_ended(self, timeout: float = 120) -> TurnDone | WorkerError:
        return await asyncio.wait_for(self._turns.get(), timeout)

    async def __aexit__(self, *exc: object) -> None:
        self.worker.stop()
        await self.running
        for sub in self.subs:
            await sub.unsubscribe()
        await self.redis.aclose()
        await self.bus.close()
