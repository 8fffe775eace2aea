"""The round-robin policy and the policy registry, without I/O: hand-built requests and results."""

from __future__ import annotations

import pytest
from aegaeon.scheduler.policies import POLICIES, UnknownPolicy, make_policy
from aegaeon.scheduler.policies.base import (
    InstanceView,
    ModelSpec,
    RequestView,
    Slo,
    TurnResult,
)
from aegaeon.scheduler.policies.round_robin import KV_LOOKAHEAD_TOKENS, RoundRobinPolicy

MODELS = ["a", "b", "c"]


def policy(instances=("w0",), quota_s=0.5, max_batch=16, kv_tokens=1 << 20) -> RoundRobinPolicy:
    models = {m: ModelSpec(m, weight_bytes=1 << 20, kv_bytes_per_token=64) for m in MODELS}
    p = RoundRobinPolicy(models, Slo(), quota_s=quota_s, max_batch=max_batch)
    for name in instances:
        p.add_instance(InstanceView(name, kv_capacity_tokens=kv_tokens))
    return p


def request(rid: str, model: str, prompt_len: int = 10, arrival: float = 0.0) -> RequestView:
    return RequestView(rid, model, prompt_len=prompt_len, max_tokens=8, arrival=arrival)


def run(p: RoundRobinPolicy, instance: str = "w0", finished=(), generated=None):
    """Ask for a turn and report it done; returns the plan."""
    plan = p.next_turn(instance, 0.0)
    assert plan is not None
    result = TurnResult(
        steps=1,
        elapsed_s=0.1,
        finished=list(finished),
        generated=generated or dict.fromkeys(plan.request_ids, 1),
    )
    p.turn_done(instance, plan, result, 0.0)
    return plan


def test_requests_go_to_the_least_loaded_instance():
    p = policy(instances=("w0", "w1"))
    for i in range(4):
        assert p.submit(request(f"r{i}", "a"), 0.0) is None
    placed = [p.requests[f"r{i}"].instance_id for i in range(4)]
    assert placed == ["w0", "w1", "w0", "w1"]


def test_a_turn_runs_all_of_one_models_requests_on_that_instance():
    p = policy()
    for rid, model in [("r1", "a"), ("r2", "b"), ("r3", "a")]:
        p.submit(request(rid, model), 0.0)
    plan = p.next_turn("w0", 0.0)
    assert plan is not None
    assert (plan.model, plan.request_ids, plan.quota_s) == ("a", ["r1", "r3"], 0.5)


def test_turns_rotate_over_the_models_that_have_work():
    p = policy()
    for rid, model in [("r1", "a"), ("r2", "b"), ("r3", "c")]:
        p.submit(request(rid, model), 0.0)
    assert [run(p).model for _ in range(4)] == ["a", "b", "c", "a"]


def test_rotation_skips_a_model_whose_requests_finished():
    p = policy()
    for rid, model in [("r1", "a"), ("r2", "b"), ("r3", "c")]:
        p.submit(request(rid, model), 0.0)
    run(p)  # a
    run(p, finished=["r2"])  # b ends
    assert [run(p).model for _ in range(3)] == ["c", "a", "c"]


def test_the_resident_model_goes_first_to_save_a_switch():
    p = policy()
    p.instances["w0"].resident_model = "b"
    p.submit(request("r1", "a"), 0.0)
    p.submit(request("r2", "b"), 0.0)
    assert run(p).model == "b"


def test_swap_out_and_prefetch_only_when_another_model_waits():
    p = policy()
    p.submit(request("r1", "a"), 0.0)
    alone = run(p)
    assert (alone.swap_out_after, alone.prefetch_model) == (False, None)
    p.submit(request("r2", "b"), 0.0)
    shared = p.next_turn("w0", 0.0)
    assert shared is not None
    assert (shared.model, shared.swap_out_after, shared.prefetch_model) == ("b", True, "a")


def test_a_busy_instance_gets_no_second_turn():
    p = policy()
    p.submit(request("r1", "a"), 0.0)
    assert p.next_turn("w0", 0.0) is not None
    assert p.next_turn("w0", 0.0) is None


def test_an_instance_with_nothing_queued_gets_no_turn():
    assert policy().next_turn("w0", 0.0) is None


def test_batch_is_bounded_by_max_batch_and_the_rest_run_next():
    p = policy(max_batch=2)
    for i in range(3):
        p.submit(request(f"r{i}", "a"), 0.0)
    assert run(p).request_ids == ["r0", "r1"]
    assert run(p).request_ids == ["r2", "r0"]


def test_batch_is_bounded_by_kv_capacity_but_never_empty():
    need = 10 + KV_LOOKAHEAD_TOKENS
    p = policy(kv_tokens=2 * need)
    for i in range(3):
        p.submit(request(f"r{i}", "a"), 0.0)
    assert run(p).request_ids == ["r0", "r1"]
    tiny = policy(kv_tokens=1)
    tiny.submit(request("big", "a"), 0.0)
    assert run(tiny).request_ids == ["big"]


def test_turn_done_books_progress_and_forgets_finished_requests():
    p = policy()
    p.submit(request("r1", "a"), 0.0)
    p.submit(request("r2", "a"), 0.0)
    run(p, finished=["r1"], generated={"r2": 5})
    assert "r1" not in p.requests
    assert (p.requests["r2"].generated, p.requests["r2"].prefilled) == (5, True)
    assert p.instances["w0"].resident_model == "a"
    assert run(p).request_ids == ["r2"]


def test_cancel_removes_a_queued_request_and_is_idempotent():
    p = policy()
    p.submit(request("r1", "a"), 0.0)
    p.cancel("r1")
    p.cancel("r1")
    assert p.next_turn("w0", 0.0) is None


def test_removed_instance_returns_its_requests_reset_for_resubmission():
    p = policy(instances=("w0", "w1"))
    for i in range(4):
        p.submit(request(f"r{i}", "a"), 0.0)
    run(p, "w0")
    lost = p.remove_instance("w0")
    assert sorted(r.request_id for r in lost) == ["r0", "r2"]
    assert all(r.instance_id is None and not r.prefilled for r in lost)
    for r in lost:
        assert p.submit(r, 0.0) is None
    assert {r.instance_id for r in p.requests.values()} == {"w1"}


def test_unknown_model_is_rejected_with_404_and_no_worker_with_503():
    assert policy().submit(request("r1", "zzz"), 0.0).status == 404
    rejection = policy(instances=()).submit(request("r1", "a"), 0.0)
    assert rejection is not None and rejection.status == 503 and rejection.retry_after


def test_registry_builds_round_robin_with_options():
    built = make_policy("round-robin", {}, Slo(), None, quota_s=0.2)
    assert isinstance(built, RoundRobinPolicy) and built.quota_s == 0.2


def test_registry_names_every_policy_of_the_issue():
    assert set(POLICIES) >= {"aegaeon", "request-level", "static-mux", "dedicated", "round-robin"}


def test_unknown_policy_name_error_lists_the_known_names():
    with pytest.raises(UnknownPolicy, match="round-robin"):
        make_policy("fifo", {}, Slo())
