"""Token events fan out per request, in order, and tokens resent after a recovery are dropped;
the router and the cluster view keep nothing past their use."""

from __future__ import annotations

import asyncio
import time

from aegaeon.gateway import streams
from aegaeon.gateway.cluster import FRESH_S, ClusterView
from aegaeon.gateway.streams import Recorded, RequestStream, StreamRouter

from aegaeon.protocol import Heartbeat, RequestStatus, TokenBatch, TokenEvent


def drain(stream: RequestStream) -> list[TokenEvent]:
    events = []
    while not stream.queue.empty():
        events.append(stream.queue.get_nowait())
    return events


def test_resent_tokens_are_trimmed_and_pure_duplicates_dropped():
    stream = RequestStream("r")
    stream.put(TokenEvent("r", 0, [1, 2, 3]))
    stream.put(TokenEvent("r", 1, [2, 3]))  # a re-run resends what was already sent
    stream.put(TokenEvent("r", 2, [3, 4, 5], [(-1.0, []), (-2.0, []), (-3.0, [])]))
    stream.put(TokenEvent("r", 5, [], finish_reason="length"))
    events = drain(stream)
    assert [e.token_ids for e in events] == [[1, 2, 3], [4, 5], []]
    assert events[1].start == 3 and events[1].logprobs == [(-2.0, []), (-3.0, [])]
    assert events[-1].finish_reason == "length"
    assert stream.received == 5


def test_a_status_is_passed_on_only_until_the_first_token():
    stream = RequestStream("r")
    queued, loading = RequestStatus("queued", position=2), RequestStatus("loading", model="m")
    stream.put(TokenEvent("r", 0, [], status=queued))
    stream.put(TokenEvent("r", 0, [], status=loading))
    stream.put(TokenEvent("r", 0, [7]))
    stream.put(TokenEvent("r", 0, [], status=queued))  # late (another scheduler tick): dropped
    stream.put(TokenEvent("r", 1, [8], finish_reason="length"))
    events = drain(stream)
    assert [e.status for e in events] == [queued, loading, None, None]
    assert [e.token_ids for e in events] == [[], [], [7], [8]] and stream.received == 2


def test_a_duplicate_that_carries_the_end_is_kept_for_its_finish_reason():
    stream = RequestStream("r")
    stream.put(TokenEvent("r", 0, [1, 2]))
    stream.put(TokenEvent("r", 0, [1, 2], finish_reason="stop"))
    events = drain(stream)
    assert events[-1].token_ids == [] and events[-1].finish_reason == "stop"


async def test_router_fans_a_batch_out_and_ignores_closed_requests():
    router = StreamRouter()
    a, b = router.open("a"), router.open("b")
    router.close("b")
    batch = TokenBatch([TokenEvent("a", 0, [7]), TokenEvent("b", 0, [8]), TokenEvent("c", 0, [9])])
    await router.on_batch(batch, None)  # type: ignore[arg-type]
    assert [e.token_ids for e in drain(a)] == [[7]]
    assert drain(b) == []


def test_a_gap_that_no_record_can_fill_ends_the_stream_with_an_explicit_error():
    stream = RequestStream("r")  # no Redis to recover from
    stream.put(TokenEvent("r", 0, [1, 2]))
    stream.put(TokenEvent("r", 5, [9]))  # tokens 2..4 were lost in transit
    stream.put(TokenEvent("r", 6, [10]))  # nothing after the error reaches the client
    events = [stream.queue.get_nowait() for _ in range(stream.queue.qsize())]
    assert [e.token_ids for e in events] == [[1, 2], []]
    assert events[-1].finish_reason == "error" and "lost" in events[-1].error


async def test_a_stream_silent_after_a_bus_reconnect_ends_with_an_error(monkeypatch):
    monkeypatch.setattr(streams, "LOST_EVENTS_GRACE_S", 0.05)
    router = streams.StreamRouter()
    silent, lively = router.open("silent"), router.open("lively")
    await router.on_reconnect()
    lively.put(TokenEvent("lively", 0, [3]))
    await asyncio.sleep(0.2)
    assert silent.queue.get_nowait().finish_reason == "error"
    assert lively.queue.get_nowait().token_ids == [3]
    assert lively.queue.empty()


class Record:
    """Redis as the gateway reads it: the worker's record of a request's output tokens."""

    def __init__(self, tokens: list[int], finish_reason=None, lag_calls: int = 0) -> None:
        self.tokens, self.finish_reason, self.lag_calls, self.calls = (
            tokens,
            finish_reason,
            lag_calls,
            0,
        )

    async def __call__(self, request_id: str, start: int) -> Recorded:
        self.calls += 1
        if self.calls <= self.lag_calls:  # the worker's write not there yet
            return Recorded(self.tokens[start : len(self.tokens) - 3])
        done = self.finish_reason is not None
        return Recorded(self.tokens[start:], self.finish_reason, len(self.tokens) if done else None)


async def test_a_gap_is_filled_from_the_record_and_later_events_keep_their_order(monkeypatch):
    monkeypatch.setattr(streams, "RECOVER_WAIT_S", 0.01)
    record = Record([1, 2, 3, 4, 5, 9, 10], lag_calls=2)
    stream = RequestStream("r", record)
    stream.put(TokenEvent("r", 0, [1, 2]))
    stream.put(TokenEvent("r", 5, [9]))  # tokens 2..4 were lost in transit
    stream.put(TokenEvent("r", 6, [10], finish_reason="length"))  # waits behind the gap
    await stream.filling
    events = drain(stream)
    assert [(e.start, e.token_ids) for e in events] == [
        (0, [1, 2]),
        (2, [3, 4, 5]),
        (5, [9]),
        (6, [10]),
    ]
    assert events[-1].finish_reason == "length" and record.calls == 3


async def test_a_stream_silent_after_a_bus_reconnect_is_completed_from_the_record(monkeypatch):
    monkeypatch.setattr(streams, "LOST_EVENTS_GRACE_S", 0.05)
    router = streams.StreamRouter(Record([4, 5, 6], finish_reason="stop"))
    ended = router.open("ended")
    ended.put(TokenEvent("ended", 0, [4]))
    await router.on_reconnect()
    await asyncio.sleep(0.3)
    events = drain(ended)
    assert [e.token_ids for e in events] == [[4], [5, 6]] and events[-1].finish_reason == "stop"


async def test_stopping_the_router_ends_its_checks_after_a_reconnect():
    router = StreamRouter()
    router.open("r")
    await router.on_reconnect()  # a check sleeps out its grace period
    checks = list(router._checks)
    await router.stop()
    assert checks and all(task.done() for task in checks) and not router._checks


def test_the_cluster_view_forgets_a_worker_gone_silent():
    view = ClusterView()
    now = time.monotonic()
    view.heartbeats["gone"] = (now - FRESH_S - 1, Heartbeat("gone", "cpu", "both", 0.0))
    view.heartbeats["here"] = (now, Heartbeat("here", "cpu", "both", 0.0))
    assert [beat.worker_id for beat in view.live_workers()] == ["here"]
    assert list(view.heartbeats) == ["here"]  # one entry per worker id ever seen, else
