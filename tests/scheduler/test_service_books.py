"""The scheduler service's pure helpers: its books, wire-to-policy conversions, CLI parsing."""

from __future__ import annotations

import time

from aegaeon.scheduler.books import (
    TrackedRequest,
    WorkerBook,
    counts_by_model,
    instance_view,
    worker_state,
)
from aegaeon.scheduler.main import policy_options

from aegaeon.protocol import Heartbeat, SamplingParams, SubmitRequest


def tracked(rid: str, model: str, outputs: list[int] | None = None) -> TrackedRequest:
    submit = SubmitRequest(
        rid, model, [1, 2, 3], SamplingParams(max_tokens=9), "gw", 0.0, outputs or []
    )
    return TrackedRequest(submit)


def test_heartbeat_capacity_becomes_the_policys_kv_capacity_in_tokens():
    beat = Heartbeat("w1", "cpu", "decode", 0.0, weight_budget_bytes=7, kv_block_size=16,
                     kv_blocks_total=10, resident_model="a")  # fmt: skip
    view = instance_view(beat)
    assert (view.instance_id, view.role, view.kv_capacity_tokens) == ("w1", "decode", 160)
    assert (view.weight_budget_bytes, view.resident_model) == (7, "a")


def test_resubmitted_request_counts_the_tokens_already_sent_as_generated():
    view = tracked("r1", "a", outputs=[5, 6]).view()
    assert (view.prompt_len, view.generated, view.context_len, view.max_tokens) == (3, 2, 5, 9)
    assert not view.prefilled


def test_the_policy_sees_the_gateways_wall_clock_arrival_on_the_schedulers_monotonic_clock():
    # The policy compares arrival-based deadlines with the monotonic ``now`` the service gives
    # it (a decode turn cut short for a waiting group): both must be on one clock.
    submit = SubmitRequest("r1", "a", [1], SamplingParams(max_tokens=9), "gw", time.time() - 2.0)
    arrival = TrackedRequest(submit).view().arrival
    assert time.monotonic() - 2.5 < arrival <= time.monotonic() - 2.0 + 0.5


def test_requests_without_a_first_token_count_as_queued_the_others_as_running():
    books = {"r1": tracked("r1", "a"), "r2": tracked("r2", "a"), "r3": tracked("r3", "b")}
    books["r2"].generated = 4
    assert counts_by_model(books) == ({"a": 1, "b": 1}, {"a": 1})


def test_worker_state_reports_kv_usage_and_the_requests_it_holds():
    beat = Heartbeat("w1", "cpu", "both", 0.0, kv_blocks_total=8, kv_blocks_free=2)
    book = WorkerBook("w1", 0.0, beat, holds={"r1", "r2"})
    state = worker_state(book)
    assert (state.kv_usage, state.num_requests, state.busy) == (0.75, 2, False)


def test_policy_options_parse_json_values_and_keep_plain_strings():
    assert policy_options(["quota_s=0.25", "mode=fast", "n=3"]) == {
        "quota_s": 0.25,
        "mode": "fast",
        "n": 3,
    }
