"""A worker's TurnDone lists every request it holds: one the scheduler does not place there (its
abort was lost with a NATS server, or it ended while it moved) is aborted, not left holding KV
for nobody. Real NATS and Redis, fake workers (test_service's harness)."""

from __future__ import annotations

from scheduler_harness import harness, wait_for

from aegaeon.protocol import AbortRequest, AssignRequest, SamplingParams

__all__ = ["harness"]  # the fixture, imported for pytest


def aborted(worker) -> list[str]:
    return [c.request_id for c in worker.of_type(AbortRequest)]


async def test_a_request_a_worker_holds_unknown_to_the_scheduler_is_aborted(harness):
    worker = await harness.worker("w1")
    await harness.scheduler()
    orphan = AssignRequest("orphan", "a", [1, 2], SamplingParams(max_tokens=5), "gw", 0.0)
    worker.held["orphan"], worker.produced["orphan"] = orphan, 0  # its abort never arrived
    assert (await harness.submit("r1", max_tokens=3)).accepted
    await wait_for(lambda: harness.finished("r1"), what="r1 to finish")
    await wait_for(lambda: "orphan" not in worker.held, what="the orphan to be aborted")
    assert aborted(worker) == ["orphan"]  # the request it serves is not touched
