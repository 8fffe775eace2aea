"""The worker acts on ``RunTurn.prefetch_model``: the named model is copied into the free slot
while the turn decodes, the next turn's switch only rebinds, and TurnDone / SwitchDone report
the bytes copied in the background and while waiting. A real engine, NATS and Redis; only the
model-store's "ensure cached" answer is faked (it points at the demo files)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import redis.asyncio as aioredis
from aegaeon.gpu_worker.engine import Engine, EngineConfig
from aegaeon.gpu_worker.worker import WorkerService
from engine_helpers import GREEDY, PROMPTS

from aegaeon.bus import Bus
from aegaeon.config import BusConfig
from aegaeon.protocol import (
    AssignRequest,
    EnsureCached,
    Heartbeat,
    ModelInfo,
    ModelReply,
    RunTurn,
    SwitchDone,
    TokenBatch,
    TurnDone,
    WorkerError,
    WorkerEvent,
)

FIRST, NEXT = "demo-llama", "demo-qwen2"


def test_turn_prefetches_the_next_model_and_its_switch_copies_nothing_while_waiting(
    demo_models_dir, nats_server, redis_server, references, device, tmp_path
):
    engine = Engine(EngineConfig(device=device, dtype="float32", arena_bytes=640 << 20,
                                 host_kv_bytes=16 << 20, host_kv_dir=str(tmp_path),
                                 copy_chunk_bytes=1 << 20))  # fmt: skip
    try:
        events, tokens = asyncio.run(_two_turns(engine, demo_models_dir, nats_server, redis_server))
    finally:
        engine.close()
    turns = [e for e in events if isinstance(e, TurnDone)]
    switches = [e for e in events if isinstance(e, SwitchDone)]
    nbytes = engine.specs[NEXT].weight_bytes
    assert [t.model for t in turns] == [FIRST, NEXT]
    assert (turns[1].switch_bytes, turns[1].prefetched_bytes) == (0, nbytes)
    assert (switches[-1].to_model, switches[-1].bytes, switches[-1].prefetched_bytes) == (
        NEXT, 0, nbytes,
    )  # fmt: skip
    for model, rid in ((FIRST, "a"), (NEXT, "b")):
        assert tokens[rid] == references(model, device)[0][0]


async def _two_turns(engine: Engine, models: Path, nats_server, redis_server) -> tuple[list, dict]:
    config = BusConfig(nats_url=nats_server.url, redis_url=redis_server.url,
                       prefix="wpf" + uuid.uuid4().hex[:8])  # fmt: skip
    bus = await Bus.connect(config, name="test-worker-prefetch")
    redis = aioredis.Redis.from_url(config.redis_url)
    worker = WorkerService("w1", "both", engine, bus, redis)
    events: list = []
    tokens: dict[str, list[int]] = {"a": [], "b": []}
    turn_done = asyncio.Queue[TurnDone | WorkerError]()
    ready = asyncio.Event()  # the worker's first heartbeat follows its command subscription

    async def ensure(request: EnsureCached, msg) -> None:
        folder = models / request.name
        info = ModelInfo(request.name, "", "", str(folder), 0, 0, 0, "float32",
                         cached=True, cache_path=str(folder / "model.safetensors"))  # fmt: skip
        await bus.reply(msg, ModelReply(info))

    async def on_event(event, _msg) -> None:
        events.append(event)
        if isinstance(event, TurnDone | WorkerError):
            await turn_done.put(event)

    async def on_heartbeat(_beat: Heartbeat, _msg) -> None:
        ready.set()

    async def on_tokens(batch: TokenBatch, _msg) -> None:
        for event in batch.events:
            tokens[event.request_id] += event.token_ids

    subs = [
        await bus.subscribe(bus.subjects.models("ensure"), EnsureCached, ensure),
        await bus.subscribe(bus.subjects.worker_events("w1"), WorkerEvent, on_event),
        await bus.subscribe(bus.subjects.tokens("g1"), TokenBatch, on_tokens),
        await bus.subscribe(bus.subjects.heartbeat, Heartbeat, on_heartbeat),
    ]
    running = asyncio.create_task(worker.run())
    await asyncio.wait_for(ready.wait(), 60)
    cmd = bus.subjects.worker_cmd("w1")
    try:
        await bus.publish(cmd, AssignRequest("a", FIRST, PROMPTS[0], GREEDY, "g1", 0.0))
        await bus.publish(cmd, RunTurn(1, FIRST, ["a"], quota_s=1e6, prefetch_model=NEXT))
        assert isinstance(await asyncio.wait_for(turn_done.get(), 120), TurnDone)
        await asyncio.wait_for(_prefetch_done(engine, NEXT), 120)
        await bus.publish(cmd, AssignRequest("b", NEXT, PROMPTS[0], GREEDY, "g1", 0.0))
        await bus.publish(cmd, RunTurn(2, NEXT, ["b"], quota_s=1e6))
        assert isinstance(await asyncio.wait_for(turn_done.get(), 120), TurnDone)
    finally:
        worker.stop()
        await running
        for sub in subs:
            await sub.unsubscribe()
        await redis.aclose()
        await bus.close()
    return events, tokens


async def _prefetch_done(engine: Engine, model: str) -> None:
    """Until the background copy of ``model`` has every byte in its slot (the worker starts it
    after a model-store round trip, so it may not even have begun when the turn ends)."""
    while True:
        copy = engine.slots._copy
        if copy is not None and copy.model == model and copy.done_bytes() == copy.nbytes:
            return
        await asyncio.sleep(0.01)
