"""A step's tokens go out while the next step computes (``WorkerService._step_until_turn_ends``):
each step's delivery but the last finds the next step already started on the engine's thread,
and the tokens are still exactly transformers'."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from engine_helpers import GREEDY, NEW_TOKENS, PROMPTS
from worker_harness import GATEWAY, WorkerHarness

from aegaeon.protocol import AssignRequest, RunTurn, TurnDone

MODEL = "demo-llama"
OVERLAP_WAIT_S = 10.0  # how long a delivery waits to see the next step start (ms when it does)


def test_each_steps_delivery_overlaps_the_next_step_and_the_tokens_stay_exact(
    demo_models_dir, nats_server, redis_server, references, device, make_engine
):
    engine = make_engine(None, host_kv_bytes=16 << 20)
    steps_started = [0]  # written on the engine's thread
    engine_step = engine.step

    def counted_step(batch: list[str]) -> Any:
        steps_started[0] += 1
        return engine_step(batch)

    engine.step = counted_step  # type: ignore[method-assign]
    overlapped: list[bool] = []  # per delivery: had the next step started?

    async def run() -> tuple[WorkerHarness, TurnDone]:
        async with WorkerHarness(engine, demo_models_dir, nats_server.url, redis_server.url) as w:
            deliver = w.worker.delivery.deliver

            async def watched_deliver(outputs: Sequence[Any]) -> list[str]:
                finished = await deliver(outputs)
                if not finished:  # a step follows: it must be under way already
                    delivered = len(overlapped) + 1
                    deadline = time.monotonic() + OVERLAP_WAIT_S
                    while steps_started[0] <= delivered and time.monotonic() < deadline:
                        await asyncio.sleep(0.001)
                    overlapped.append(steps_started[0] > delivered)
                return finished

            w.worker.delivery.deliver = watched_deliver  # type: ignore[method-assign]
            await w.send(AssignRequest("a", MODEL, PROMPTS[0], GREEDY, GATEWAY, 0.0))
            await w.send(RunTurn(1, MODEL, ["a"], quota_s=1e6))
            done = await w.turn_ended()
        return w, done

    w, done = asyncio.run(run())
    assert isinstance(done, TurnDone) and done.finished == ["a"]
    assert done.steps == steps_started[0] == NEW_TOKENS
    assert overlapped == [True] * (NEW_TOKENS - 1)
    assert w.tokens["a"] == references(MODEL, device)[0][0]
