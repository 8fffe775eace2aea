"""``RunTurn.pinned``: a worker keeps the pinned model in a weight slot through a burst of other
models' turns, seen from its own SwitchDone events, and the pinned model's tokens stay exact. A
real engine, NATS and Redis; only the model-store's "ensure cached" answer is faked."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aegaeon.gpu_worker.engine import Engine
from engine_helpers import GREEDY, PROMPTS
from worker_harness import GATEWAY, WorkerHarness

from aegaeon.protocol import AssignRequest, RunTurn, SwitchDone, TurnDone

PINNED = "demo-llama"
BURST = ["demo-qwen2", "demo-gpt2", "demo-mistral", "demo-qwen2", "demo-gpt2"]


def test_a_pinned_model_is_never_copied_again_through_a_burst_of_other_models(
    demo_models_dir, nats_server, redis_server, references, device, make_engine
):
    engine = make_engine(None, host_kv_bytes=16 << 20)
    events, tokens = asyncio.run(_burst(engine, demo_models_dir, nats_server, redis_server))
    switches = [e for e in events if isinstance(e, SwitchDone)]
    into_pinned = [s for s in switches if s.to_model == PINNED]
    assert into_pinned[0].bytes > 0  # its first load
    assert [(s.bytes, s.prefetched_bytes) for s in into_pinned[1:]] == [(0, 0)]  # a rebind
    assert {s.to_model for s in switches} == {PINNED, *BURST}
    assert tokens["p0"] == tokens["p1"] == references(PINNED, device)[0][0]


async def _burst(engine: Engine, models: Path, nats_server, redis_server) -> tuple[list, dict]:
    async with WorkerHarness(engine, models, nats_server.url, redis_server.url) as w:
        turn = 0

        async def run(rid: str, model: str) -> None:
            nonlocal turn
            turn += 1
            await w.send(AssignRequest(rid, model, PROMPTS[0], GREEDY, GATEWAY, 0.0))
            await w.send(RunTurn(turn, model, [rid], quota_s=1e6, pinned=PINNED))
            assert isinstance(await w.turn_ended(), TurnDone)

        await run("p0", PINNED)
        for i, model in enumerate(BURST):
            await run(f"x{i}", model)
        await run("p1", PINNED)
    return w.events, w.tokens
