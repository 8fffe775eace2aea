"""The scheduler and a model's lifecycle: a loading or draining model's new requests are refused
(503 / 409), accepted ones finish, a drained model is unloaded from every worker only once
nothing of it is left, and a removed one is unknown. Real NATS and Redis, fake workers and
model-store (``test_service``'s harness)."""

from __future__ import annotations

import asyncio

import pytest
from aegaeon.scheduler.estimators import Estimator, load_estimator
from scheduler_harness import CONTEXT, expected_stream, harness, wait_for

from aegaeon.protocol import (
    EvictIdle,
    EvictModel,
    ModelChanged,
    ModelInfo,
    RunTurn,
    UnloadModel,
    UnloadReply,
)

__all__ = ["harness"]  # the fixture, imported for pytest

pytestmark = pytest.mark.timeout(60)


async def announce(h, name: str, state: str = "ready", removed: bool = False) -> None:
    """What the model-store publishes when a model moves."""
    info = ModelInfo(name, "LlamaForCausalLM", "llama", f"/models/{name}", 1 << 20, 1 << 18,
                     CONTEXT, "float32", kv_bytes_per_token=256, state=state)  # type: ignore[arg-type]  # fmt: skip
    await h.bus.publish(h.bus.subjects.registry_changed, ModelChanged(info, removed=removed))


async def unload(h, name: str) -> UnloadReply:
    return await h.bus.request(h.bus.subjects.unload_model, UnloadModel(name), UnloadReply)


async def test_a_draining_model_refuses_new_requests_finishes_accepted_ones_then_unloads(harness):
    worker = await harness.worker("w1")
    worker.answer = False  # r1's turn waits until the test runs it
    made: list[Estimator] = []
    await harness.scheduler(estimator_factory=lambda models: made.append(load_estimator(None, models)) or made[0])  # fmt: skip
    assert (await harness.submit("r1", "a", max_tokens=4)).accepted
    await wait_for(lambda: worker.of_type(RunTurn), what="r1's turn")

    harness.model_states["a"] = "draining"
    await announce(harness, "a", "draining")
    for _ in range(100):
        refused = await harness.submit("r2", "a")
        if not refused.accepted:
            break
        await asyncio.sleep(0.02)
    assert refused.status == 409 and "'a' is draining" in refused.reason
    busy = await unload(harness, "a")
    assert not busy.unloaded and busy.queued + busy.running == 1
    assert not worker.of_type(EvictModel)

    worker.tokens_per_turn, worker.answer = 4, True
    await worker.run_turn(worker.of_type(RunTurn)[-1])
    await wait_for(lambda: harness.finished("r1"), what="r1 to finish")
    assert harness.stream("r1") == expected_stream(4)  # the accepted request ran to its end
    for _ in range(100):  # until the scheduler has heard that r1 ended
        done = await unload(harness, "a")
        if done.unloaded:
            break
        await asyncio.sleep(0.02)
    assert done.unloaded and done.workers == ["w1"]
    await wait_for(lambda: worker.of_type(EvictModel), what="the eviction")
    assert [c.model for c in worker.of_type(EvictModel)] == ["a"]
    assert (await harness.submit("r3", "a")).status == 409  # still refused until removed

    harness.model_names = ["b"]
    await announce(harness, "a", "draining", removed=True)
    for _ in range(100):
        gone = await harness.submit("r4", "a")
        if gone.status == 404:
            break
        await asyncio.sleep(0.02)
    assert gone.status == 404 and "does not exist" in gone.reason
    assert (await harness.submit("r5", "b")).accepted  # other models are untouched
    estimator = made[0]
    assert "a" not in estimator.profiles and "b" in estimator.profiles  # nothing kept of "a"
    assert not any(model == "a" for _, model in estimator.scales)


async def test_a_loading_model_is_refused_with_503_until_the_store_says_it_is_ready(harness):
    harness.model_states["a"] = "loading"
    await harness.worker("w1")
    await harness.scheduler()
    loading = await harness.submit("r1", "a")
    assert not loading.accepted and loading.status == 503 and loading.retry_after
    assert "'a' is loading" in loading.reason
    harness.model_states["a"] = "ready"  # and its news lost: the scheduler asks before refusing
    assert (await harness.submit("r2", "a")).accepted


async def test_a_model_deployed_after_start_is_planned_by_the_aegaeon_policy_and_served(harness):
    """A model the scheduler first hears of at runtime gets its estimator's default step times
    before the policy plans with them (it once failed the submit with a KeyError)."""
    await harness.worker("w1", tokens_per_turn=3)
    service = await harness.scheduler(
        policy="aegaeon", policy_options={},
        estimator_factory=lambda models: load_estimator(None, models),
    )  # fmt: skip
    assert "fresh" not in service.models
    harness.model_names.append("fresh")
    await announce(harness, "fresh", "ready")
    await wait_for(lambda: "fresh" in service.models, what="the news of fresh")
    assert (await harness.submit("r1", "fresh", max_tokens=3)).accepted
    await wait_for(lambda: harness.finished("r1"), what="r1 to finish")
    assert harness.stream("r1") == expected_stream(3)


async def test_a_model_idle_past_its_keep_alive_is_evicted_once_and_a_pinned_one_never(harness):
    """Keep-alive (services/scheduler/keep_alive.py): once a's request ended and a stayed idle for
    its keep-alive, every worker gets EvictModel(a) and every model-store EvictIdle(a), once; b,
    idle as long with the same keep-alive but pinned, is kept."""
    told: list[str] = []

    async def on_evict(message: EvictIdle, _msg) -> None:
        told.append(message.name)

    await harness.bus.subscribe(harness.bus.subjects.models("evict"), EvictIdle, on_evict)
    worker = await harness.worker("w1", tokens_per_turn=4)
    await harness.scheduler()
    for name, pin in (("a", 0), ("b", 1)):
        info = ModelInfo(name, "LlamaForCausalLM", "llama", f"/models/{name}", 1 << 20, 1 << 18,
                         CONTEXT, "float32", kv_bytes_per_token=256, pin=pin, keep_alive_s=0.5)  # fmt: skip
        await harness.bus.publish(harness.bus.subjects.registry_changed, ModelChanged(info))
    assert (await harness.submit("r1", "a", max_tokens=4)).accepted
    await wait_for(lambda: harness.finished("r1"), what="r1 to finish")
    await wait_for(lambda: worker.of_type(EvictModel), what="a's eviction")
    await asyncio.sleep(1.0)  # two more keep-alives: neither a again nor b
    assert [c.model for c in worker.of_type(EvictModel)] == ["a"]
    assert told == ["a"]
    assert harness.stream("r1") == expected_stream(4)
