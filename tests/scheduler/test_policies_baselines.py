"""The baselines without a device: routing, FCFS and SRTF order, scale-out."""

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
from aegaeon.scheduler.policies.sllm_plus import SllmPlusPolicy

SLO = Slo(10.0, 0.1)
GB = 1 << 30


def models(**sizes_gb: float) -> dict[str, ModelSpec]:
    return {n: ModelSpec(n, int(s * GB), kv_bytes_per_token=1024) for n, s in sizes_gb.items()}


def request(rid: str, model: str, arrival: float = 0.0, max_tokens: int = 20) -> RequestView:
    return RequestView(rid, model, prompt_len=10, max_tokens=max_tokens, arrival=arrival)


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


def test_request_level_serves_an_older_request_of_another_model_before_newer_arrivals():
    policy = with_instances(RequestLevelPolicy(models(A=1, B=1), SLO), 1)
    policy.submit(request("a0", "A", arrival=0.0), 0.0)
    assert run_turn(policy, "i0", 0.1).model == "A"
    policy.submit(request("b0", "B", arrival=0.2), 0.2)
    policy.submit(request("a1", "A", arrival=0.3), 0.3)  # resident model, but b0 is older
    assert run_turn(policy, "i0", 0.4).request_ids == ["a0"]
    assert run_turn(policy, "i0", 0.5, finished=["a0"]).request_ids == ["a0"]
    assert run_turn(policy, "i0", 0.6).request_ids == ["b0"]
    assert run_turn(policy, "i0", 0.7, finished=["b0"]).model == "B"
    assert run_turn(policy, "i0", 0.8).request_ids == ["a1"]


def test_request_level_lets_new_arrivals_join_the_running_batch_while_nothing_older_waits():
    policy = with_instances(RequestLevelPolicy(models(A=1, B=1), SLO), 1)
    policy.submit(request("a0", "A", arrival=0.0), 0.0)
    run_turn(policy, "i0", 0.1)
    policy.submit(request("a1", "A", arrival=0.2), 0.2)
    assert run_turn(policy, "i0", 0.3).request_ids == ["a0", "a1"]


def test_request_level_batches_every_waiting_request_of_the_model_it_switches_to():
    policy = with_instances(RequestLevelPolicy(models(A=1, B=1), SLO), 1)
    policy.submit(request("a0", "A", arrival=0.0), 0.0)
    run_turn(policy, "i0", 0.1)
    for rid, model, t in (("b0", "B", 0.2), ("a1", "A", 0.3), ("b1", "B", 0.4)):
        policy.submit(request(rid, model, arrival=t), t)
    run_turn(policy, "i0", 0.5, finished=["a0"])
    assert run_turn(policy, "i0", 0.6).request_ids == ["b0", "b1"]


def test_request_level_never_preempts_a_started_request():
    policy = with_instances(RequestLevelPolicy(models(A=1, B=1), SLO), 1)
    policy.submit(request("a0", "A", arrival=0.0), 0.0)
    policy.submit(request("a1", "A", arrival=0.1), 0.1)
    run_turn(policy, "i0", 0.2)  # both started
    policy.submit(request("b0", "B", arrival=0.3), 0.3)
    assert run_turn(policy, "i0", 0.4, finished=["a0"]).request_ids == ["a0", "a1"]
    assert run_turn(policy, "i0", 0.5).request_ids == ["a1"]  # a1 finishes before B runs


def test_request_level_routes_to_the_instance_where_the_model_is_warm():
    policy = with_instances(RequestLevelPolicy(models(A=1, B=1), SLO), 2)
    policy.instances["i1"].resident_model = "A"
    policy.submit(request("a0", "A"), 0.0)
    assert policy.requests["a0"].instance_id == "i1"


def test_request_level_scales_out_to_an_idle_instance_rather_than_queue():
    policy = with_instances(RequestLevelPolicy(models(A=1, B=1), SLO), 2)
    policy.submit(request("a0", "A"), 0.0)
    run_turn(policy, policy.requests["a0"].instance_id, 0.1)
    policy.submit(request("b0", "B", arrival=0.2), 0.2)
    assert policy.requests["b0"].instance_id != policy.requests["a0"].instance_id


def test_request_level_cold_starts_on_the_least_recently_used_idle_instance():
    policy = with_instances(RequestLevelPolicy(models(A=1, B=1, C=1), SLO), 2)
    policy.submit(request("a0", "A"), 0.0)
    run_turn(policy, "i0", 1.0, finished=["a0"])
    policy.submit(request("b0", "B", arrival=2.0), 2.0)
    run_turn(policy, "i1", 3.0, finished=["b0"])
    policy.submit(request("c0", "C", arrival=4.0), 4.0)
    assert policy.requests["c0"].instance_id == "i0"  # used last at 1.0, i1 at 3.0


def test_request_level_queues_where_its_model_already_waits_when_no_instance_is_free():
    policy = with_instances(RequestLevelPolicy(models(A=1, B=1, C=1), SLO), 2)
    policy.submit(request("a0", "A"), 0.0)
    policy.submit(request("b0", "B"), 0.0)
    policy.submit(request("c0", "C", arrival=0.1), 0.1)  # no instance free: queues
    policy.submit(request("c1", "C", arrival=0.2), 0.2)
    assert policy.requests["c1"].instance_id == policy.requests["c0"].instance_id


# ---------------------------------------------------------------- sllm-plus


class StepCosts:
    """Decode 10 ms/step, prefill 50 ms, switch 1 s."""

    def prefill_time(self, model: str, prompt_lens: list[int]) -> float:
        return 0.05

    def decode_time(self, model: str, context_lens: list[int]) -> float:
        return 0.01

    def switch_time(self, model: str) -> float:
        return 1.0


def test_sllm_plus_runs_the_shortest_remaining_request_first_whatever_its_arrival():
    policy = with_instances(SllmPlusPolicy(models(A=1, B=1), SLO, StepCosts()), 1)
    policy.submit(request("a0", "A", arrival=0.0, max_tokens=500), 0.0)
    policy.submit(request("b0", "B", arrival=0.1, max_tokens=10), 0.1)
    assert run_turn(policy, "i0", 0.2).request_ids == ["b0"]


def test_sllm_plus_counts_the_switch_a_non_resident_model_would_pay():
    policy = with_instances(SllmPlusPolicy(models(A=1, B=1), SLO, StepCosts()), 1)
    policy.instances["i0"].resident_model = "A"
    policy.submit(request("a0", "A", arrival=0.0, max_tokens=60), 0.0)  # 0.65 s
    policy.submit(request("b0", "B", arrival=0.1, max_tokens=10), 0.1)  # 0.15 s + 1 s switch
    assert run_turn(policy, "i0", 0.2).model == "A"


def test_sllm_plus_orders_a_models_batch_shortest_remaining_first():
    policy = with_instances(SllmPlusPolicy(models(A=1), SLO, StepCosts()), 1)
    policy.submit(request("long", "A", arrival=0.0, max_tokens=300), 0.0)
    policy.submit(request("short", "A", arrival=0.1, max_tokens=5), 0.1)
    assert run_turn(policy, "i0", 0.2).request_ids == ["short", "long"]


def test_sllm_plus_remaining_time_comes_from_max_tokens_less_generated():
    policy = SllmPlusPolicy(models(A=1), SLO, StepCosts())
    fresh = request("r", "A", max_tokens=100)
    half = RequestView("s", "A", prompt_len=10, max_tokens=100, arrival=0.0, generated=50,
                       prefilled=True)  # fmt: skip
    assert policy.remaining_time(fresh) == 0.05 + 100 * 0.01
    assert policy.remaining_time(half) == 50 * 0.01


def test_sllm_plus_preempting_for_another_model_drops_the_displaced_kv():
    """The displaced model's instance unloads with its KV (the paper's simulator evicts every
    request on a swap): its started request is recomputed when it runs again."""
    policy = with_instances(SllmPlusPolicy(models(A=1, B=1), SLO, StepCosts()), 1)
    policy.submit(request("a0", "A", arrival=0.0, max_tokens=500), 0.0)
    first = run_turn(policy, "i0", 0.0)
    assert first.model == "A" and first.drop_kv == [] and policy.requests["a0"].prefilled
    policy.submit(request("b0", "B", arrival=0.1, max_tokens=2), 0.1)
    second = run_turn(policy, "i0", 0.2)
    assert (second.model, second.drop_kv) == ("B", ["a0"])
    assert not policy.requests["a0"].prefilled  # its remaining time counts the prefill again
    assert policy.remaining_time(policy.requests["a0"]) > 495 * 0.01 + 0.05 - 1e-9


def test_request_level_switches_only_between_periods_so_it_drops_nothing():
    policy = with_instances(RequestLevelPolicy(models(A=1, B=1), SLO), 1)
    policy.submit(request("a0", "A", arrival=0.0), 0.0)
    run_turn(policy, "i0", 0.0)
    policy.submit(request("b0", "B", arrival=0.1), 0.1)
    plans = [run_turn(policy, "i0", 0.2 + i, finished=["a0"] if i == 0 else ()) for i in range(2)]
    assert [p.model for p in plans] == ["A", "B"] and all(p.drop_kv == [] for p in plans)
