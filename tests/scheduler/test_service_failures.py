"""The scheduler service through failures and restarts, against real NATS and Redis with the
fake workers, model-store and gateway of ``scheduler_harness``: a worker that dies or drains, a
scheduler restarted on the Redis queue, Redis and NATS restarts. A fake worker emits token
``1000 + index`` for output position ``index``, so a recovery that re-sends or skips a token
shows up as a wrong or missing index.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from scheduler_harness import (
    GATEWAY,
    Harness,
    expected_stream,
    final_state,
    harness,
    wait_for,
)

from aegaeon.protocol import (
    AbortRequest,
    AssignRequest,
    RunTurn,
    SamplingParams,
    SubmitReply,
    SubmitRequest,
)
from aegaeon.servers import free_port, start_nats, start_redis

__all__ = ["harness"]  # the fixture, imported for pytest


async def test_dead_workers_requests_continue_on_another_worker_after_the_tokens_sent(harness):
    first = await harness.worker("w1", tokens_per_turn=2)
    first.die_after_turns = 1
    second = await harness.worker("w2")
    await harness.scheduler()
    assert (await harness.submit("r1", max_tokens=5)).accepted
    await wait_for(lambda: harness.finished("r1"), what="r1 to finish on w2")
    assigned = second.of_type(AssignRequest)
    assert [a.request_id for a in assigned] == ["r1"]
    assert assigned[0].output_token_ids == [1000, 1001]  # what the client already has
    assert harness.stream("r1") == expected_stream(5)  # no duplicate, no gap


async def test_request_whose_tokens_all_went_out_before_a_crash_just_ends(harness):
    first = await harness.worker("w1", tokens_per_turn=2)
    first.crash_on_last_token = True
    second = await harness.worker("w2")
    await harness.scheduler()
    await harness.submit("r1", max_tokens=2)

    def closing_events() -> list[tuple[int, str | None]]:
        return [(e.start, e.finish_reason) for e in harness.tokens["r1"] if not e.token_ids]

    await wait_for(closing_events, what="the scheduler's finish event")
    assert closing_events() == [(2, "length")]
    assert harness.stream("r1") == expected_stream(2)
    assert second.of_type(AssignRequest) == []  # nothing left to run
    assert await final_state(harness, "r1") == b"finished"


async def test_when_no_worker_is_left_the_gateway_gets_an_error_event(harness):
    only = await harness.worker("w1")
    only.die_after_turns = 1
    await harness.scheduler()
    await harness.submit("r1", max_tokens=5)
    await wait_for(lambda: harness.finished("r1"), what="error event")
    last = harness.tokens["r1"][-1]
    assert last.finish_reason == "error" and last.error
    assert last.start == 1  # after the token the client already has
    state = await final_state(harness, "r1")  # written after the error event went out
    assert not await harness.redis.hexists(harness.keys.queue, "r1")
    assert state == b"error"


async def test_restarted_scheduler_resumes_the_redis_queue(harness):
    worker = await harness.worker("w1")
    await harness.scheduler()
    worker.die_after_turns = None
    worker.answer = True
    original_run_turn = worker.run_turn

    async def run_one_then_stall(turn: RunTurn) -> None:
        worker.answer = False  # the next turns wait (the scheduler is about to go away)
        await original_run_turn(turn)

    worker.run_turn = run_one_then_stall  # type: ignore[method-assign]
    await harness.submit("r1", max_tokens=4)
    await wait_for(lambda: len(harness.stream("r1")) == 1, what="first token")
    await harness.stop_scheduler()
    assert await harness.redis.hexists(harness.keys.queue, "r1")

    worker.run_turn = original_run_turn  # type: ignore[method-assign]
    worker.answer = True
    before = len(worker.commands)
    await harness.scheduler()
    await wait_for(lambda: harness.finished("r1"), what="r1 to finish after the restart")
    resumed = [c for c in worker.commands[before:] if isinstance(c, AssignRequest)]
    assert [a.output_token_ids for a in resumed] == [[1000]]
    assert harness.stream("r1") == expected_stream(4)


async def test_draining_worker_hands_its_requests_to_another_worker(harness):
    first = await harness.worker("w1")
    service = await harness.scheduler()
    first.answer = False
    await harness.submit("r1", max_tokens=3)
    await wait_for(lambda: first.of_type(RunTurn), what="turn on w1")
    second = await harness.worker("w2")
    first.draining = True  # the next heartbeats say so; the turn in flight still ends

    def drain_heard() -> bool:  # before the TurnDone: else w1 would get the next turn
        book = service.workers.get("w1")
        return book is not None and book.draining and "w2" in service.workers

    await wait_for(drain_heard, what="the scheduler to hear w1 draining and w2 joining")
    await first.run_turn(first.of_type(RunTurn)[0])  # one token
    await wait_for(lambda: harness.finished("r1"), what="r1 to finish on w2")
    assert [a.output_token_ids for a in second.of_type(AssignRequest)] == [[1000]]
    assert [a.request_id for a in first.of_type(AbortRequest)] == ["r1"]  # frees its copy
    assert len(first.of_type(RunTurn)) == 1  # no new turn for a draining worker
    assert harness.stream("r1") == expected_stream(3)


async def test_scheduler_survives_a_redis_restart(nats_server, tmp_path):
    port = free_port()
    redis_server = start_redis(tmp_path / "r1", port=port)
    h = await Harness(nats_server.url, redis_server.url).open()
    try:
        await h.worker("w1")
        service = await h.scheduler()
        failed: list[str] = []  # what the scheduler's Redis attempts that failed were for
        retry = service.store._retry

        async def noting_failures(what: str, op: Any, default: Any, *delays: Any) -> Any:
            async def attempt() -> Any:
                try:
                    return await op()
                except Exception:
                    failed.append(what)
                    raise

            return await retry(what, attempt, default, *delays)

        service.store._retry = noting_failures  # type: ignore[method-assign]
        redis_server.kill()
        pending = asyncio.create_task(h.submit("r1", max_tokens=2))
        # Once one attempt has failed, the scheduler is retrying its write.
        await wait_for(lambda: "persist r1" in failed, what="the scheduler's write of r1 to fail")
        redis_server = start_redis(tmp_path / "r2", port=port)
        assert (await pending).accepted
        await wait_for(lambda: h.finished("r1"), what="r1 to finish after the outage")
        assert await h.redis.hget(h.keys.request("r1"), "state") == b"finished"
    finally:
        with contextlib.suppress(Exception):
            await h.close()
        redis_server.stop()


async def test_queue_writes_missed_in_a_long_redis_outage_are_made_once_it_is_back(nats_server, tmp_path):  # fmt: skip
    port = free_port()
    redis_server = start_redis(tmp_path / "r1", port=port)
    h = await Harness(nats_server.url, redis_server.url).open()
    try:
        worker = await h.worker("w1")
        service = await h.scheduler()
        redis_server.kill()  # longer than the store's retries: each write gives up

        async def submit(rid: str) -> SubmitReply:
            request = SubmitRequest(rid, "a", [1, 2], SamplingParams(max_tokens=2), GATEWAY, 0.0)
            return await h.bus.request(h.bus.subjects.submit, request, SubmitReply, timeout=60)

        assert (await submit("r1")).accepted
        await wait_for(lambda: h.finished("r1"), what="r1 to finish during the outage")
        worker.answer = False  # r2 is still running when Redis is back
        assert (await submit("r2")).accepted
        unwritten = service.store._unwritten
        await wait_for(lambda: set(unwritten) == {"r1", "r2"}, what="both writes to give up")
        redis_server = start_redis(tmp_path / "r2", port=port)  # a new, empty Redis
        await wait_for(lambda: not unwritten, what="the missed writes to be made")
        assert await h.redis.hget(h.keys.request("r1"), "finish_reason") == b"length"
        assert await h.redis.hkeys(h.keys.queue) == [b"r2"]  # a restart resumes r2, not r1
    finally:
        with contextlib.suppress(Exception):
            await h.close()
        redis_server.stop()


async def test_scheduler_keeps_serving_after_a_nats_restart(redis_server, tmp_path):
    port = free_port()
    nats = start_nats(tmp_path / "n1", port=port)
    h = await Harness(nats.url, redis_server.url).open()
    try:
        await h.worker("w1")
        service = await h.scheduler(heartbeat_timeout_s=3.0)
        nats.stop()
        await wait_for(
            lambda: not h.bus.nc.is_connected and not service.bus.nc.is_connected,
            what="the test client and the scheduler to lose NATS",
        )
        nats = start_nats(tmp_path / "n2", port=port)
        await wait_for(lambda: h.bus.nc.is_connected, what="test client reconnected")
        reply = None
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:  # until the scheduler's subscriptions are back
            with contextlib.suppress(Exception):
                reply = await h.bus.request(
                    h.bus.subjects.submit,
                    SubmitRequest("r1", "a", [1, 2], SamplingParams(max_tokens=2), GATEWAY, 0.0),
                    SubmitReply,
                    timeout=0.5,
                )
                break
            await asyncio.sleep(0.1)
        assert reply is not None and reply.accepted
        await wait_for(lambda: h.finished("r1"), what="r1 to finish after the restart")
    finally:
        with contextlib.suppress(Exception):
            await h.close()
        nats.stop()
