"""The worker acts on ``RunTurn.prefetch_model`` and on ``PrefetchModel`` sent mid-turn: the named model is copied into the free slot
while the turn decodes, the next turn's switch only rebinds, and TurnDone / SwitchDone report
the bytes copied in the background and while waiting; a staging overtaken by a switch is
dropped. A real engine, NATS and Redis; only the
model-store's "ensure cached" answer is faked (``worker_harness``)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import msgspec
from aegaeon.gpu_worker.engine import Engine
from aegaeon.gpu_worker.residency import Residency
from engine_helpers import GREEDY, NEW_TOKENS, PROMPTS
from worker_harness import GATEWAY, WorkerHarness

from aegaeon.protocol import (
    AssignRequest,
    Preempt,
    PrefetchModel,
    RunTurn,
    SwitchDone,
    TurnDone,
)

FIRST, NEXT = "demo-llama", "demo-qwen2"


def test_turn_prefetches_the_next_model_and_its_switch_copies_nothing_while_waiting(
    demo_models_dir, nats_server, redis_server, references, device, make_engine
):
    engine = make_engine(None, host_kv_bytes=16 << 20, copy_chunk_bytes=1 << 20)
    events, tokens, token_events = asyncio.run(
        _two_turns(engine, demo_models_dir, nats_server, redis_server)
    )
    turns = [e for e in events if isinstance(e, TurnDone)]
    switches = [e for e in events if isinstance(e, SwitchDone)]
    nbytes = engine.specs[NEXT].weight_bytes
    assert [t.model for t in turns] == [FIRST, NEXT]
    assert (turns[1].switch_bytes, turns[1].prefetched_bytes) == (0, nbytes)
    assert (switches[-1].to_model, switches[-1].bytes, switches[-1].prefetched_bytes) == (
        NEXT, 0, nbytes,
    )  # fmt: skip
    assert not switches[-1].staged_while_idle  # staged while turn 1 ran
    for model, rid in ((FIRST, "a"), (NEXT, "b")):
        assert tokens[rid] == references(model, device)[0][0]
    # The cold model's request heard it load before its first token; the prefetched one's not.
    first = token_events["a"][0]
    assert first.status is not None and not first.token_ids
    assert (first.status.state, first.status.model) == ("loading", FIRST)
    assert [e for e in token_events["b"] if e.status is not None] == []


async def _two_turns(engine: Engine, models: Path, nats_server, redis_server) -> tuple[list, dict, dict]:  # fmt: skip
    async with WorkerHarness(engine, models, nats_server.url, redis_server.url) as w:
        await w.send(AssignRequest("a", FIRST, PROMPTS[0], GREEDY, GATEWAY, 0.0))
        await w.send(RunTurn(1, FIRST, ["a"], quota_s=1e6, prefetch_model=NEXT))
        assert isinstance(await w.turn_ended(), TurnDone)
        await asyncio.wait_for(_prefetch_done(engine, NEXT), 120)
        await w.send(AssignRequest("b", NEXT, PROMPTS[0], GREEDY, GATEWAY, 0.0))
        await w.send(RunTurn(2, NEXT, ["b"], quota_s=1e6))
        assert isinstance(await w.turn_ended(), TurnDone)
    return w.events, w.tokens, w.token_events


async def _prefetch_done(engine: Engine, model: str) -> None:
    """Until the background copy of ``model`` has every byte in its slot (the worker starts it
    after a model-store round trip, so it may not even have begun when the turn ends)."""
    while True:
        copy = engine.slots._copy
        if copy is not None and copy.model == model and copy.done_bytes() == copy.nbytes:
            return
        await asyncio.sleep(0.01)


def test_a_prefetch_named_mid_turn_copies_while_that_turn_decodes_and_changes_no_token(
    demo_models_dir, nats_server, redis_server, references, device, make_engine
):
    """The scheduler restages a busy worker (``PrefetchModel``) when a request of another model
    arrives: the copy runs beside the turn's decode steps, not queued behind the turn, and
    neither the decoding request's tokens nor the next model's change."""
    engine = make_engine(None, host_kv_bytes=16 << 20, copy_chunk_bytes=1 << 20)
    events, tokens, copied_mid_turn = asyncio.run(
        _restaged_mid_turn(engine, demo_models_dir, nats_server, redis_server)
    )
    assert copied_mid_turn, "the prefetch did not complete while the first turn still ran"
    turns = [e for e in events if isinstance(e, TurnDone)]
    nbytes = engine.specs[NEXT].weight_bytes
    assert [t.model for t in turns] == [FIRST, NEXT]
    assert (turns[1].switch_bytes, turns[1].prefetched_bytes) == (0, nbytes)
    first = references(FIRST, device)[0][0]
    assert len(tokens["a"]) >= len(first) and tokens["a"][: len(first)] == first
    assert tokens["b"] == references(NEXT, device)[0][0]


async def _restaged_mid_turn(
    engine: Engine, models: Path, nats_server, redis_server
) -> tuple[list, dict, bool]:
    long = msgspec.structs.replace(
        GREEDY, max_tokens=1500
    )  # decodes far longer than the copy takes
    async with WorkerHarness(engine, models, nats_server.url, redis_server.url) as w:
        await w.send(AssignRequest("a", FIRST, PROMPTS[0], long, GATEWAY, 0.0))
        await w.send(RunTurn(1, FIRST, ["a"], quota_s=1e6))
        while not w.tokens["a"]:  # the turn is decoding
            await asyncio.sleep(0.005)
        await w.send(PrefetchModel(NEXT))
        await asyncio.wait_for(_prefetch_done(engine, NEXT), 120)
        running = w.worker.turn
        copied_mid_turn = running is not None and running.command.turn_id == 1
        while len(w.tokens["a"]) < NEW_TOKENS:  # enough to compare with the reference
            await asyncio.sleep(0.005)
        await w.send(Preempt(1))
        assert isinstance(await w.turn_ended(), TurnDone)
        await w.send(AssignRequest("b", NEXT, PROMPTS[0], GREEDY, GATEWAY, 0.0))
        await w.send(RunTurn(2, NEXT, ["b"], quota_s=1e6))
        assert isinstance(await w.turn_ended(), TurnDone)
    return w.events, w.tokens, copied_mid_turn


def test_a_model_staged_on_an_idle_worker_is_reported_as_staged_while_idle(
    demo_models_dir, nats_server, redis_server, make_engine
):
    """A staging asked of an idle worker (the scheduler's guess at the next arrival) hid
    nothing behind another model's decode: the switch that finds it says so
    (``SwitchDone.staged_while_idle``), which ``bench serve`` keeps apart from the bytes
    copied behind a turn."""
    engine = make_engine(None, host_kv_bytes=16 << 20)
    events = asyncio.run(_staged_on_idle(engine, demo_models_dir, nats_server, redis_server))
    switches = [e for e in events if isinstance(e, SwitchDone)]
    nbytes = engine.specs[NEXT].weight_bytes
    assert [(s.to_model, s.prefetched_bytes, s.staged_while_idle) for s in switches] == [
        (FIRST, 0, False), (NEXT, nbytes, True),
    ]  # fmt: skip


async def _staged_on_idle(engine: Engine, models: Path, nats_server, redis_server) -> list:
    async with WorkerHarness(engine, models, nats_server.url, redis_server.url) as w:
        await w.send(AssignRequest("a", FIRST, PROMPTS[0], GREEDY, GATEWAY, 0.0))
        await w.send(RunTurn(1, FIRST, ["a"], quota_s=1e6))
        assert isinstance(await w.turn_ended(), TurnDone)
        await w.send(PrefetchModel(NEXT))  # idle: stage NEXT for the next arrival
        await asyncio.wait_for(_prefetch_done(engine, NEXT), 120)
        await w.send(AssignRequest("b", NEXT, PROMPTS[0], GREEDY, GATEWAY, 0.0))
        await w.send(RunTurn(2, NEXT, ["b"], quota_s=1e6))
        assert isinstance(await w.turn_ended(), TurnDone)
    return w.events


def test_stopping_the_worker_cancels_a_prefetch_still_waiting_for_the_store(
    demo_models_dir, nats_server, redis_server, make_engine
):
    """A prefetch whose model-store answer has not come when the worker stops ends with it
    (rather than asking the engine thread for a copy after it shut down)."""
    engine = make_engine(None, host_kv_bytes=16 << 20)
    pending = asyncio.run(_stop_during_prefetch(engine, demo_models_dir, nats_server, redis_server))  # fmt: skip
    assert pending and all(pending)


async def _stop_during_prefetch(engine: Engine, models: Path, nats_server, redis_server) -> list[bool]:  # fmt: skip
    never = asyncio.Event()
    async with WorkerHarness(engine, models, nats_server.url, redis_server.url) as w:
        asked = asyncio.Event()

        async def store_never_answers(model: str) -> None:
            asked.set()
            await never.wait()

        w.worker._ensure_model = store_never_answers  # type: ignore[method-assign]
        await w.send(PrefetchModel(NEXT))
        await asyncio.wait_for(asked.wait(), 30)
        pending = list(w.worker._prefetch_tasks)
    # Read here, as the worker left them: asyncio.run would cancel what is left on return.
    return [task.cancelled() for task in pending]


def test_a_staging_overtaken_by_a_switch_is_dropped_and_the_slots_stay_as_the_switch_left_them(
    demo_models_dir, nats_server, redis_server, make_engine
):
    """An idle worker is asked to stage a model, and a turn of a third model switches before the
    model-store has answered for it. That switch copied its model into the free slot and left
    the model before it in the other, as the scheduler's books now count on (``switch_slots``):
    the late staging must not copy over it."""
    engine = make_engine(None, host_kv_bytes=16 << 20)
    slots, dropped = asyncio.run(
        _staging_overtaken(engine, demo_models_dir, nats_server, redis_server)
    )
    assert dropped, "the staging task did not end"
    assert sorted(m for m in slots if m) == sorted([FIRST, THIRD])
    assert engine.slots.prefetching is None


THIRD = "demo-mistral"


def test_a_staging_waits_out_only_the_switch_of_the_turn_in_hand_when_it_was_asked() -> None:
    """The rule of the test above, case by case: a wish made while turn 7 ran (or was queued)
    survives turn 7's switch and no other; one made while idle survives no switch."""
    started: list[str] = []
    worker = object.__new__(Residency)
    worker.engine = SimpleNamespace(start_prefetch=started.append, slots=SimpleNamespace(prefetching=None))  # type: ignore[assignment]  # fmt: skip
    worker._switches, worker._last_switch_turn = 3, 7
    assert worker._prefetch_on_engine("x", 3, None)  # no switch since
    assert worker._prefetch_on_engine("x", 2, 7)  # turn 7's own switch
    assert not worker._prefetch_on_engine("x", 2, None)  # asked while idle
    assert not worker._prefetch_on_engine("x", 2, 6)  # another turn's switch
    assert not worker._prefetch_on_engine("x", 1, 7)  # two switches
    assert started == ["x", "x"]


async def _staging_overtaken(
    engine: Engine, models: Path, nats_server, redis_server
) -> tuple[list[str | None], bool]:
    async with WorkerHarness(engine, models, nats_server.url, redis_server.url) as w:
        await w.send(AssignRequest("a", FIRST, PROMPTS[0], GREEDY, GATEWAY, 0.0))
        await w.send(RunTurn(1, FIRST, ["a"], quota_s=1e6))
        assert isinstance(await w.turn_ended(), TurnDone)
        ensure, asked, answer = w.worker._ensure_model, asyncio.Event(), asyncio.Event()

        async def store_answers_late_for_next(model: str) -> None:
            if model == NEXT:
                asked.set()
                await answer.wait()
            await ensure(model)

        w.worker._ensure_model = store_answers_late_for_next  # type: ignore[method-assign]
        await w.send(PrefetchModel(NEXT))  # idle: stage NEXT
        await asyncio.wait_for(asked.wait(), 30)
        staging = list(w.worker._prefetch_tasks)
        await w.send(AssignRequest("c", THIRD, PROMPTS[0], GREEDY, GATEWAY, 0.0))
        await w.send(RunTurn(2, THIRD, ["c"], quota_s=1e6))
        assert isinstance(await w.turn_ended(), TurnDone)
        answer.set()
        done, _ = await asyncio.wait(staging, timeout=60)
        return list(engine.slots.models), len(done) == len(staging) > 0
