"""``aegaeon bench stack``: worker stamps paired with client receive times by (request, index)."""

from __future__ import annotations

import pytest

from aegaeon.bench.client import StreamTiming
from aegaeon.bench.stack import Stamps, pair_added_latency, record_stamps
from aegaeon.protocol import TokenBatch, TokenEvent, decode, encode


def batches(request_id: str, stamps: list[float]) -> list[TokenBatch]:
    """One batch per step, one token each, as the worker publishes them."""
    return [TokenBatch([TokenEvent(request_id, i, [100 + i])], sent_at=t)
            for i, t in enumerate(stamps)]  # fmt: skip


def received(request_id: str, times: list[float], ok: bool = True) -> StreamTiming:
    return StreamTiming(list(times), ok, request_id=request_id, wall_times=list(times),
                        finish_reason="length" if ok else None)  # fmt: skip


def test_a_constant_per_token_delay_after_the_worker_is_measured_in_full() -> None:
    # Gaps between tokens are the same on both sides, so subtracting step times from gaps would
    # read 0 here; the stamps show the 5 ms every token spends after the worker.
    sent = [10.000, 10.020, 10.045, 10.050]
    stamps: Stamps = {}
    for batch in batches("r1", sent):
        record_stamps(decode(encode(batch), TokenBatch), stamps)  # through the wire format
    added, left_out = pair_added_latency([received("r1", [t + 0.005 for t in sent])], stamps, 4)
    assert added == pytest.approx([0.005] * 4)
    assert not left_out


def test_tokens_pair_by_request_and_index_whatever_the_order_they_arrive_in() -> None:
    stamps: Stamps = {}
    record_stamps(TokenBatch([TokenEvent("b", 0, [1]), TokenEvent("a", 1, [2])], sent_at=2.0), stamps)  # fmt: skip
    record_stamps(TokenBatch([TokenEvent("a", 0, [3]), TokenEvent("b", 1, [4])], sent_at=1.0), stamps)  # fmt: skip
    runs = [received("a", [1.5, 2.25]), received("b", [2.5, 1.75])]
    added, _ = pair_added_latency(runs, stamps, 2)
    assert added == pytest.approx([0.5, 0.25, 0.5, 0.75])


def test_a_recovery_rerun_keeps_the_first_stamp_of_a_token() -> None:
    stamps: Stamps = {}
    record_stamps(TokenBatch([TokenEvent("r", 0, [1, 2])], sent_at=1.0), stamps)
    record_stamps(TokenBatch([TokenEvent("r", 1, [2])], sent_at=9.0), stamps)
    assert stamps == {("r", 0): 1.0, ("r", 1): 1.0}


def test_requests_that_cannot_be_paired_token_for_token_are_left_out_and_counted() -> None:
    stamps: Stamps = {}
    for rid in ("short", "unfinished", "unstamped", "good"):
        for batch in batches(rid, [1.0, 2.0, 3.0]):
            record_stamps(batch, stamps)
    record_stamps(TokenBatch([TokenEvent("old-worker", 0, [1])]), stamps)  # sent_at 0: no stamp
    runs = [
        received("short", [1.1, 2.1]),  # a token without text: chunks != max_tokens
        received("unfinished", [1.1, 2.1, 3.1], ok=False),
        received("unstamped-elsewhere", [1.1, 2.1, 3.1]),
        received("good", [1.1, 2.1, 3.1]),
    ]
    added, left_out = pair_added_latency(runs, stamps, 3)
    assert added == pytest.approx([0.1, 0.1, 0.1])
    assert left_out == {"tokens != max_tokens": 1, "request not finished": 1,
                        "token without a worker stamp": 3}  # fmt: skip
    _, left_out = pair_added_latency([received("old-worker", [1.0])], stamps, 1)
    assert left_out == {"token without a worker stamp": 1}
