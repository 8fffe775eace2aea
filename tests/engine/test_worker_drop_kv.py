"""``RunTurn.drop_kv``: the worker drops a request's KV before the turn (as a ServerlessLLM
instance loses it when it unloads the request's model), and the request's next turn recomputes
it (prefill of prompt + tokens so far) with exactly transformers' tokens."""

from __future__ import annotations

import asyncio

from engine_helpers import GREEDY, PROMPTS
from worker_harness import GATEWAY, WorkerHarness

from aegaeon.protocol import AssignRequest, RunTurn, TurnDone

A, B = "demo-llama", "demo-qwen2"


def test_a_dropped_request_is_recomputed_on_its_next_turn_with_the_same_tokens(
    demo_models_dir, nats_server, redis_server, references, device, make_engine
):
    engine = make_engine(None, host_kv_bytes=16 << 20)

    async def run() -> tuple[WorkerHarness, list]:
        async with WorkerHarness(engine, demo_models_dir, nats_server.url, redis_server.url) as w:
            await w.send(AssignRequest("a", A, PROMPTS[0], GREEDY, GATEWAY, 0.0))
            await w.send(RunTurn(1, A, ["a"], quota_s=1e6, max_steps=4))
            await w.send(AssignRequest("b", B, PROMPTS[1], GREEDY, GATEWAY, 0.0))
            await w.send(RunTurn(2, B, ["b"], quota_s=1e6, drop_kv=["a"]))
            await w.send(RunTurn(3, A, ["a"], quota_s=1e6))
            turns = [await w.turn_ended() for _ in range(3)]
        return w, turns

    w, turns = asyncio.run(run())
    dropped = engine.counters["dropped"]
    assert all(isinstance(t, TurnDone) for t in turns)
    assert dropped == 1
    assert turns[2].prefilled == ["a"]  # recomputed there, not swapped in
    assert w.tokens["a"] == references(A, device)[0][0]
    assert w.tokens["b"] == references(B, device)[0][1]
