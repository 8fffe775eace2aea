"""A submit the scheduler has seen before (a gateway sends it again when its bus connection came
back while it waited for the answer) is answered "accepted" and never runs the request twice:
while it runs, just after it ended, and after a take-over by another scheduler (Redis says it
ended), even when the admission checks would refuse it now. A submit whose cancel came while it
waited to be admitted (its gateway gave up) does not run. Real NATS and Redis, fake workers (test_service's harness)."""

from __future__ import annotations

import asyncio

from aegaeon.scheduler.books import RecentIds
from scheduler_harness import expected_stream, final_state, harness, wait_for

from aegaeon.protocol import AssignRequest, CancelRequest

__all__ = ["harness"]  # the fixture, imported for pytest


def assigned(worker, rid: str) -> int:
    return sum(1 for c in worker.of_type(AssignRequest) if c.request_id == rid)


async def test_a_submit_sent_again_after_its_request_ended_does_not_run_it_again(harness):
    worker = await harness.worker("w1")
    scheduler = await harness.scheduler()
    assert (await harness.submit("r1", max_tokens=2)).accepted
    await wait_for(lambda: harness.finished("r1"), what="r1 to finish")
    again = await harness.submit("r1", max_tokens=2)
    assert again.accepted and again.queued_ahead == 0
    assert "r1" not in scheduler.requests  # admission happens before the answer: none
    assert (await harness.submit("r2", max_tokens=2)).accepted
    await wait_for(lambda: harness.finished("r2"), what="r2 to finish")
    assert assigned(worker, "r1") == 1
    assert harness.stream("r1") == expected_stream(2)


async def test_after_a_take_over_redis_says_which_submits_have_ended(harness):
    worker = await harness.worker("w1")
    await harness.scheduler()
    assert (await harness.submit("r1", max_tokens=2)).accepted
    await wait_for(lambda: harness.finished("r1"), what="r1 to finish")
    assert await final_state(harness, "r1") == b"finished"
    await harness.stop_scheduler()
    successor = await harness.scheduler()
    assert "r1" not in successor.ended  # it never ran here
    assert (await harness.submit("r1", max_tokens=2)).accepted
    assert "r1" not in successor.requests
    assert assigned(worker, "r1") == 1


async def test_a_submit_sent_again_while_it_waits_is_accepted_even_with_the_queue_full(harness):
    worker = await harness.worker("w1")
    worker.answer = False
    scheduler = await harness.scheduler(max_queue=1)
    assert (await harness.submit("r1")).accepted
    again = await harness.submit("r1")
    assert again.accepted, again.reason  # it was: 503 "queue is full", and the gateway cancelled
    assert list(scheduler.requests) == ["r1"]
    assert assigned(worker, "r1") == 1


async def test_after_a_take_over_an_ended_submit_is_accepted_even_when_it_would_be_refused(
    harness,
):
    worker = await harness.worker("w1")
    await harness.scheduler()
    assert (await harness.submit("r1", max_tokens=2)).accepted
    await wait_for(lambda: harness.finished("r1"), what="r1 to finish")
    await harness.stop_scheduler()
    worker.answer = False
    successor = await harness.scheduler(max_queue=1)
    assert (await harness.submit("r0")).accepted  # waits: the queue is full now
    again = await harness.submit("r1", max_tokens=2)
    assert again.accepted, again.reason  # it ran: not 503 "queue is full" (its stream has ended)
    assert list(successor.requests) == ["r0"]
    assert assigned(worker, "r1") == 1


def test_recent_ids_keep_the_last_ones_added():
    recent = RecentIds(3)
    for rid in ("a", "b", "a", "c", "d"):
        recent.add(rid)
    assert "a" not in recent and all(r in recent for r in "bcd") and len(recent) == 3


async def test_a_cancel_heard_while_its_submit_waits_for_a_worker_keeps_it_from_running(harness):
    scheduler = await harness.scheduler(wait_ready=False, heartbeat_timeout_s=30.0)
    await wait_for(lambda: harness.states, what="the scheduler to listen")
    submitted = asyncio.create_task(harness.submit("r1"))  # waits: no worker is up yet
    await harness.bus.publish(harness.bus.subjects.cancel, CancelRequest("r1", "abort"))
    await wait_for(lambda: "r1" in scheduler.cancelled_unseen, what="the cancel to be heard")
    worker = await harness.worker("w1")
    reply = await submitted
    assert not reply.accepted and reply.status == 409
    assert "r1" not in scheduler.requests and assigned(worker, "r1") == 0
    assert (await harness.submit("r2", max_tokens=2)).accepted  # the scheduler serves on
    await wait_for(lambda: harness.finished("r2"), what="r2 to finish")
