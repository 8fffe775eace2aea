"""The scheduler service against real NATS and Redis, with the fake workers, model-store and
gateway of ``scheduler_harness`` (they stand in for the other services; the scheduler is the real
one). A fake worker emits token ``1000 + index`` for output position ``index`` of any request,
so a recovery that re-sends or skips a token shows up as a wrong or missing index.
"""

from __future__ import annotations

import pytest
from aegaeon.scheduler import liveness
from aegaeon.scheduler.estimators import load_estimator
from aegaeon.scheduler.policies import POLICIES
from scheduler_harness import (
    CONTEXT,
    expected_stream,
    final_state,
    harness,
    wait_for,
)

from aegaeon.protocol import (
    AbortRequest,
    AssignRequest,
    CancelRequest,
    PrefetchModel,
    RunTurn,
    WorkerError,
)

__all__ = ["harness"]  # the fixture, imported for pytest

# ---------------------------------------------------------------------- admission and turns


async def test_request_is_assigned_then_run_in_turns_until_it_finishes(harness):
    worker = await harness.worker("w1")
    await harness.scheduler()
    assert (await harness.submit("r1", max_tokens=3)).accepted
    await wait_for(lambda: harness.finished("r1"), what="r1 to finish")
    assert harness.stream("r1") == expected_stream(3)
    first = worker.commands[:2]
    assert isinstance(first[0], AssignRequest) and first[0].request_id == "r1"
    assert isinstance(first[1], RunTurn) and (first[1].model, first[1].request_ids) == ("a", ["r1"])
    assert len(worker.of_type(AssignRequest)) == 1  # a worker is told about a request once


async def test_finished_request_leaves_the_queue_and_its_metadata_expires(harness):
    await harness.worker("w1")
    await harness.scheduler()
    await harness.submit("r1", max_tokens=2)
    await wait_for(lambda: harness.finished("r1"))
    redis, keys = harness.redis, harness.keys

    async def dequeued() -> bool:
        return not await redis.hexists(keys.queue, "r1")

    await wait_for(dequeued, what="r1 to leave the Redis queue")
    assert not await redis.hexists(keys.queue, "r1")
    assert await redis.hget(keys.request("r1"), "state") == b"finished"
    assert await redis.hget(keys.request("r1"), "finish_reason") == b"length"
    assert 0 < await redis.ttl(keys.request("r1")) <= 3600
    assert await redis.ttl(keys.output_tokens("r1")) in (-2, *range(1, 3601))  # gone or expiring


async def test_turns_rotate_between_models_on_one_worker(harness):
    worker = await harness.worker("w1")
    worker.answer = False
    await harness.scheduler()
    await harness.submit("ra", "a", max_tokens=3)
    await harness.submit("rb", "b", max_tokens=3)
    await wait_for(lambda: worker.of_type(RunTurn), what="first turn")
    worker.answer = True
    await worker.run_turn(worker.of_type(RunTurn)[0])
    await wait_for(lambda: harness.finished("ra") and harness.finished("rb"), what="both")
    turns = worker.of_type(RunTurn)
    assert [t.model for t in turns] == ["a", "b", "a", "b", "a", "b"]
    assert turns[1].swap_out_after and turns[1].prefetch_model == "a"
    assert harness.stream("ra") == harness.stream("rb") == expected_stream(3)


async def test_a_worker_left_idle_is_told_to_stage_the_model_most_asked_for_that_it_lacks(
    harness,
):
    """c asked twice, then a, then b: the idle worker holds b and a (its two slots), and is
    sent a PrefetchModel for c after b's last turn."""
    harness.model_names = ["a", "b", "c"]
    worker = await harness.worker("w1", tokens_per_turn=2)
    await harness.scheduler(policy="aegaeon", policy_options={})
    for rid, model in [("rc1", "c"), ("rc2", "c"), ("ra", "a"), ("rb", "b")]:
        assert (await harness.submit(rid, model, max_tokens=2)).accepted
        await wait_for(lambda rid=rid: harness.finished(rid), what=f"{rid} to finish")
    staged = await wait_for(lambda: worker.of_type(PrefetchModel), what="a PrefetchModel")
    assert [c.model for c in staged] == ["c"]
    assert worker.commands.index(staged[0]) > worker.commands.index(worker.of_type(RunTurn)[-1])


async def test_the_decode_times_workers_report_teach_the_estimator(harness):
    """A turn's TurnDone carries its decode seconds; the scheduler feeds them to the policy's
    estimator, whose decode prediction moves to what the worker measured."""
    worker = await harness.worker("w1", tokens_per_turn=5)
    worker.turn_done_extras = {"decode_s": 4 * 0.5}  # 0.5 s per decode step: a slow device
    service = await harness.scheduler(
        policy="aegaeon", policy_options={},
        estimator_factory=lambda models: load_estimator(None, models),
    )  # fmt: skip
    before = service.estimator.decode_time("a", [20])
    await harness.submit("r1", "a", max_tokens=20)
    await wait_for(lambda: harness.finished("r1"), what="r1 to finish")
    assert service.estimator.decode_time("a", [20]) > 10 * before  # roofline: milliseconds
    assert service.estimator.decode_time("a", [20]) == pytest.approx(0.5, rel=0.2)


async def test_waiting_requests_hear_their_queue_position_until_their_first_token(harness):
    worker = await harness.worker("w1")
    worker.answer = False  # turns wait until the test runs them
    await harness.scheduler()
    replies = [await harness.submit(rid, model) for rid, model in (("r1", "a"), ("r2", "b"), ("r3", "b"))]  # fmt: skip
    assert [r.queued_ahead for r in replies] == [0, 1, 2]
    await wait_for(lambda: worker.of_type(RunTurn), what="the first turn")
    await worker.run_turn(worker.of_type(RunTurn)[0])  # r1's first token: the others move up

    def positions(rid: str) -> list[int | None]:
        return [e.status.position for e in harness.tokens[rid] if e.status is not None]

    await wait_for(lambda: positions("r2") == [0] and positions("r3") == [1], what="new places")
    assert positions("r1") == [] and all(not e.token_ids for rid in ("r2", "r3") for e in harness.tokens[rid])  # fmt: skip


async def test_unknown_model_is_rejected_with_404(harness):
    await harness.worker("w1")
    await harness.scheduler()
    reply = await harness.submit("r1", model="nope")
    assert (reply.accepted, reply.status) == (False, 404)


async def test_a_model_larger_than_every_workers_weight_slot_is_refused_clearly(harness):
    worker = await harness.worker("w1")
    # The test models have 1 MiB of weights: the whole budget would hold one, a slot does not.
    worker.weight_budget_bytes, worker.slot_bytes = 3 << 19, 3 << 18
    service = await harness.scheduler()

    def budget_heard() -> bool:
        book = service.workers.get("w1")
        return book is not None and book.heartbeat.slot_bytes == 3 << 18

    await wait_for(budget_heard, what="the scheduler to hear a heartbeat of w1 with its budget")
    reply = await harness.submit("r1")
    assert (reply.accepted, reply.status) == (False, 400)
    assert "largest weight slot" in reply.reason and "--arena-bytes" in reply.reason


async def test_prompt_longer_than_the_context_is_rejected_with_413(harness):
    await harness.worker("w1")
    await harness.scheduler()
    reply = await harness.submit("r1", prompt_len=CONTEXT, max_tokens=1)
    assert (reply.accepted, reply.status) == (False, 413)
    assert not await harness.redis.hexists(harness.keys.queue, "r1")


async def test_full_admission_queue_answers_503_with_retry_after(harness):
    worker = await harness.worker("w1")
    worker.answer = False
    await harness.scheduler(max_queue=2)
    assert (await harness.submit("r1")).accepted
    assert (await harness.submit("r2")).accepted
    reply = await harness.submit("r3")
    assert (reply.accepted, reply.status) == (False, 503)
    assert reply.retry_after and reply.retry_after > 0


async def test_no_worker_at_all_answers_503(harness):
    await harness.scheduler()
    reply = await harness.submit("r1")
    assert (reply.accepted, reply.status) == (False, 503)


async def test_cancel_sends_abort_to_the_worker_holding_the_request(harness):
    worker = await harness.worker("w1")
    worker.answer = False
    await harness.scheduler()
    await harness.submit("r1", max_tokens=5)
    await wait_for(lambda: worker.of_type(RunTurn), what="turn")
    await harness.bus.publish(harness.bus.subjects.cancel, CancelRequest("r1"))
    await wait_for(lambda: worker.of_type(AbortRequest), what="abort")
    assert worker.of_type(AbortRequest)[0].request_id == "r1"
    await wait_for(lambda: "r1" not in worker.held)
    state = await final_state(harness, "r1")  # written after the abort went out
    assert not await harness.redis.hexists(harness.keys.queue, "r1")
    assert state == b"cancelled"


async def test_turn_without_turn_done_frees_the_worker_after_the_timeout(harness, monkeypatch):
    # The fake worker's heartbeats name no turn, so after LOST_TURN_GRACE_S (3 s) the turn would
    # also end as lost: put that out of reach, and only the turn timeout can free the worker
    # (however long a busy machine takes to get there).
    monkeypatch.setattr(liveness, "LOST_TURN_GRACE_S", 3600.0)
    worker = await harness.worker("w1")
    worker.answer = False
    await harness.scheduler(turn_timeout_s=0.3)
    await harness.submit("r1")
    await wait_for(lambda: len(worker.of_type(RunTurn)) >= 2, what="a second turn")


async def test_worker_error_for_a_request_ends_it_with_an_error_event(harness):
    worker = await harness.worker("w1")
    worker.answer = False
    await harness.scheduler()
    await harness.submit("r1")
    await wait_for(lambda: worker.of_type(RunTurn))
    error = WorkerError("w1", "engine exploded", request_id="r1")
    await harness.bus.publish(harness.bus.subjects.worker_events("w1"), error)
    await wait_for(lambda: harness.finished("r1"), what="error event")
    last = harness.tokens["r1"][-1]
    # The cause stays in the scheduler's log; the client is told no internals.
    assert (last.finish_reason, last.error) == ("error", "the worker failed on this request")
    await wait_for(lambda: worker.of_type(AbortRequest), what="abort to the worker")


async def test_scheduler_state_reports_workers_and_queues(harness):
    worker = await harness.worker("w1")
    worker.answer = False
    await harness.scheduler()
    await harness.submit("r1", model="b")
    await wait_for(lambda: any(s.queued.get("b") == 1 for s in harness.states), what="state")
    state = next(s for s in harness.states if s.queued.get("b") == 1)
    assert state.policy == "round-robin"
    assert [(w.worker_id, w.busy) for w in state.workers] == [("w1", True)]


async def test_model_registered_after_start_is_accepted(harness):
    await harness.worker("w1")
    await harness.scheduler()
    harness.model_names.append("late")
    reply = await harness.submit("r1", model="late", max_tokens=2)
    assert reply.accepted
    await wait_for(lambda: harness.finished("r1"))


@pytest.mark.parametrize("policy", sorted(set(POLICIES) - {"test-handoff"}))
async def test_every_registered_policy_runs_requests_to_completion_through_the_service(
    harness, policy
):
    await harness.worker("w1", tokens_per_turn=2)
    await harness.worker("w2", tokens_per_turn=2)
    await harness.scheduler(policy=policy, policy_options={})
    for rid, model in [("ra", "a"), ("rb", "b"), ("ra2", "a")]:
        assert (await harness.submit(rid, model, max_tokens=4)).accepted
    await wait_for(
        lambda: all(harness.finished(r) for r in ("ra", "rb", "ra2")), what=f"{policy} to finish"
    )
    for rid in ("ra", "rb", "ra2"):
        assert harness.stream(rid) == expected_stream(4)
