"""A worker that obeys a newer scheduler term drops what an older term still sends (the
fencing token on its commands). A real engine, NATS and Redis."""

from __future__ import annotations

import asyncio

from aegaeon.gpu_worker.engine import Engine
from aegaeon.scheduler.fencing import FencedBus
from engine_helpers import GREEDY, PROMPTS
from worker_harness import GATEWAY, WORKER, WorkerHarness

from aegaeon.protocol import AssignRequest, RunTurn, TurnDone


def test_a_deposed_leaders_commands_are_dropped_and_the_new_leaders_run(
    demo_models_dir, nats_server, redis_server, make_engine
):
    engine = make_engine(None, host_kv_bytes=16 << 20)
    turns = asyncio.run(_two_leaders(engine, demo_models_dir, nats_server, redis_server))
    assert [t.turn_id for t in turns] == [1, 3]  # turn 2, the deposed leader's, never ran


async def _two_leaders(engine: Engine, models, nats_server, redis_server) -> list[TurnDone]:
    async with WorkerHarness(engine, models, nats_server.url, redis_server.url) as w:
        new, old = FencedBus(w.bus, lambda: True, 20), FencedBus(w.bus, lambda: True, 10)
        subject = w.bus.subjects.worker_cmd(WORKER)
        model = "demo-llama"
        await new.publish(subject, AssignRequest("a", model, PROMPTS[0], GREEDY, GATEWAY, 0.0))
        await new.publish(subject, RunTurn(1, model, ["a"], quota_s=1e6))
        first = await w.turn_ended()
        await old.publish(subject, AssignRequest("b", model, PROMPTS[1], GREEDY, GATEWAY, 0.0))
        await old.publish(subject, RunTurn(2, model, ["b"], quota_s=1e6))
        await new.publish(subject, AssignRequest("c", model, PROMPTS[1], GREEDY, GATEWAY, 0.0))
        await new.publish(subject, RunTurn(3, model, ["c"], quota_s=1e6))
        second = await w.turn_ended()
        assert "b" not in w.worker.held  # the old term's assignment was dropped too
    return [first, second]  # type: ignore[list-item]
