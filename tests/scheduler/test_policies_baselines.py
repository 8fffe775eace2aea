"""The three baselines without a device: routing, switching and partition decisions."""

from __future__ import annotations

from aegaeon.scheduler.policies.base import (
    InstanceView,
    ModelSpec,
    RequestView,
    Slo,
    TurnPlan,
    TurnResult,
)
from aegaeon.scheduler.policies.dedicated import DedicatedPolicy
from aegaeon.scheduler.policies.request_level import RequestLevelPolicy
from aegaeon.scheduler.policies.serving import ServingPolicy
from aegaeon.scheduler.policies.static_mux import StaticMuxPolicy, partition

SLO = Slo(10.0, 0.1)
GB = 1 << 30


def models(**sizes_gb: float) -> dict[str, ModelSpec]:
    return {n: ModelSpec(n, int(s * GB), kv_bytes_per_token=1024) for n, s in sizes_gb.items()}


def request(rid: str, model: str, arrival: float = 0.0) -> RequestView:
    return RequestView(rid, model, prompt_len=10, max_tokens=20, arrival=arrival)


def with_instances(policy: ServingPolicy, count: int, budget_gb: float = 100) -> ServingPolicy:
    for i in range(count):
        policy.add_instance(InstanceView(f"i{i}", weight_budget_bytes=int(budget_gb * GB)))
    return policy


def run_turn(policy: ServingPolicy, instance_id: str, now: float, finished=()) -> TurnPlan:
    plan = policy.next_turn(instance_id, now)
    assert plan is not None
    result = TurnResult(
        steps=1,
        elapsed_s=0.1,
        finished=list(finished),
        generated={r: 5 for r in plan.request_ids},
    )
    policy.turn_done(instance_id, plan, result, now)
    return plan


# ---------------------------------------------------------------- dedicated


def test_dedicated_binds_each_model_to_its_own_instance():
    policy = with_instances(DedicatedPolicy(models(A=1, B=1), SLO), 2)
    policy.submit(request("a", "A"), 0.0)
    policy.submit(request("b", "B"), 0.0)
    assert policy.requests["a"].instance_id != policy.requests["b"].instance_id


def test_dedicated_never_runs_another_model_on_an_instance():
    policy = with_instances(DedicatedPolicy(models(A=1, B=1), SLO), 2)
    for k in range(3):
        policy.submit(request(f"a{k}", "A"), float(k))
    owner = policy.owner["A"]
    plans = [run_turn(policy, owner, float(k)) for k in range(2)]
    assert {p.model for p in plans} == {"A"}


def test_dedicated_rejects_a_model_without_an_instance_of_its_own():
    policy = with_instances(DedicatedPolicy(models(A=1, B=1, C=1), SLO), 2)
    rejection = policy.submit(request("c", "C"), 0.0)
    assert rejection is not None and rejection.status == 503
    assert "no instance of its own" in rejection.reason


# ---------------------------------------------------------------- request-level


def test_request_level_keeps_the_model_until_its_work_is_done():
    policy = with_instances(RequestLevelPolicy(models(A=1, B=1), SLO), 1)
    policy.submit(request("a0", "A"), 0.0)
    policy.submit(request("b0", "B"), 0.1)
    assert run_turn(policy, "i0", 0.2).model == "A"
    policy.submit(request("a1", "A"), 0.3)  # joins the running model, ahead of b0
    assert run_turn(policy, "i0", 0.4, finished=["a0"]).request_ids == ["a0", "a1"]
    assert run_turn(policy, "i0", 0.5, finished=["a1"]).model == "A"
    assert run_turn(policy, "i0", 0.6).model == "B"  # only now does it switch


def test_request_level_routes_to_the_instance_where_the_model_is_warm():
    policy = with_instances(RequestLevelPolicy(models(A=1, B=1), SLO), 2)
    policy.instances["i1"].resident_model = "A"
    policy.submit(request("a0", "A"), 0.0)
    assert policy.requests["a0"].instance_id == "i1"


def test_request_level_queues_fcfs_behind_the_least_loaded_instance_when_all_are_busy():
    policy = with_instances(RequestLevelPolicy(models(A=1, B=1, C=1), SLO), 2)
    policy.submit(request("a0", "A"), 0.0)
    policy.submit(request("b0", "B"), 0.0)
    policy.submit(request("b1", "B"), 0.0)
    policy.submit(request("c0", "C"), 0.0)
    assert policy.requests["c0"].instance_id == policy.requests["a0"].instance_id


# ---------------------------------------------------------------- static-mux


def test_partition_balances_weight_bytes_over_instances():
    owner = partition({"A": 4, "B": 3, "C": 2, "D": 1}, ["i0", "i1"], {"i0": 5, "i1": 5})
    loads = {i: sum(s for m, s in {"A": 4, "B": 3, "C": 2, "D": 1}.items() if owner[m] == i)
             for i in ("i0", "i1")}  # fmt: skip
    assert loads == {"i0": 5, "i1": 5}


def test_static_mux_serves_a_model_only_on_its_partition():
    policy = with_instances(StaticMuxPolicy(models(A=2, B=2, C=2, D=2), SLO), 2)
    for k, model in enumerate("ABCD" * 2):
        policy.submit(request(f"r{k}", model), 0.0)
        assert policy.requests[f"r{k}"].instance_id == policy.owner[model]


def test_static_mux_time_slices_among_the_models_of_its_set():
    policy = with_instances(StaticMuxPolicy(models(A=1, B=1), SLO), 1)
    policy.submit(request("a0", "A"), 0.0)
    policy.submit(request("b0", "B"), 0.0)
    seen = [run_turn(policy, "i0", float(k)).model for k in range(4)]
    assert seen == ["A", "B", "A", "B"]


def test_cancel_removes_a_request_from_its_instance_queue():
    policy = with_instances(StaticMuxPolicy(models(A=1), SLO), 1)
    policy.submit(request("a0", "A"), 0.0)
    policy.cancel("a0")
    assert policy.next_turn("i0", 0.0) is None
