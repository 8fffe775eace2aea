"""Priority classes and the maximum wait, in every policy that orders work of several models:
a higher class first, nobody past the maximum wait left behind, one class = no change."""

from __future__ import annotations

import pytest
from aegaeon.scheduler.estimators import Estimator, ModelProfile
from aegaeon.scheduler.policies.aegaeon import AegaeonPolicy
from aegaeon.scheduler.policies.base import InstanceView, ModelSpec, RequestView, Slo
from aegaeon.scheduler.policies.request_level import RequestLevelPolicy
from aegaeon.scheduler.policies.sllm_plus import SllmPlusPolicy
from fixed_costs import FixedCosts

from aegaeon.priority import check_priority, rank
from aegaeon.sim.engine import simulate
from aegaeon.workload import TraceRequest

SLO = Slo(ttft_s=10.0, tbt_s=0.1)
GB = 1 << 30


def specs(**classes: str) -> dict[str, ModelSpec]:
    return {n: ModelSpec(n, GB, 1024, priority=c) for n, c in classes.items()}


def request(rid: str, model: str, arrival: float, out: int = 20) -> RequestView:
    return RequestView(rid, model, prompt_len=10, max_tokens=out, arrival=arrival)


def test_classes_rank_high_first_and_unknown_names_are_refused():
    assert rank("high") < rank("normal") < rank("low")
    assert check_priority("low") == "low"
    with pytest.raises(ValueError, match="low, normal, high"):
        check_priority("urgent")


# ---------------------------------------------------------------- baselines


def busy_instance(policy, now: float = 0.0):
    """One instance, busy with a first request of "X" so that the others queue behind it."""
    policy.add_instance(InstanceView("i0", weight_budget_bytes=100 * GB))
    policy.submit(request("x", "X", now), now)
    plan = policy.next_turn("i0", now)
    assert plan is not None and plan.model == "X"
    return plan


@pytest.mark.parametrize("policy_class", [RequestLevelPolicy, SllmPlusPolicy])
def test_a_baseline_serves_the_higher_class_first(policy_class):
    policy = policy_class(specs(X="normal", L="low", H="high"), SLO)
    busy_instance(policy)
    policy.submit(request("l", "L", 1.0), 1.0)  # older, but of the low class
    policy.submit(request("h", "H", 2.0, out=200), 2.0)  # longer, but of the high class
    policy.cancel("x")
    policy.instances["i0"].busy = False
    plan = policy.next_turn("i0", 3.0)
    assert plan is not None and plan.model == "H"


@pytest.mark.parametrize("policy_class", [RequestLevelPolicy, SllmPlusPolicy])
def test_past_the_maximum_wait_a_lower_class_goes_first(policy_class):
    policy = policy_class(specs(X="normal", L="low", H="high"), SLO)
    policy.max_wait_s = 5.0
    busy_instance(policy)
    policy.submit(request("l", "L", 1.0, out=5), 1.0)
    policy.submit(request("h", "H", 2.0, out=200), 2.0)
    policy.cancel("x")
    policy.instances["i0"].busy = False
    plan = policy.next_turn("i0", 6.5)  # "l" has waited 5.5 s, "h" 4.5 s
    assert plan is not None and plan.model == "L"


def test_with_one_class_request_level_stays_fcfs_and_sllm_plus_stays_srtf():
    fcfs = RequestLevelPolicy(specs(X="low", A="low", B="low"), SLO)
    srtf = SllmPlusPolicy(specs(X="low", A="low", B="low"), SLO)
    for policy in (fcfs, srtf):
        policy.max_wait_s = 0.5  # "a" starves: with one class the maximum wait changes nothing
        busy_instance(policy)
        policy.submit(request("a", "A", 1.0, out=200), 1.0)
        policy.submit(request("b", "B", 2.0, out=5), 2.0)
        policy.cancel("x")
        policy.instances["i0"].busy = False
    assert fcfs.next_turn("i0", 9.0).model == "A"  # type: ignore[union-attr]
    assert srtf.next_turn("i0", 9.0).model == "B"  # type: ignore[union-attr]


def test_a_request_level_period_of_the_high_class_admits_its_later_arrivals():
    # FCFS alone would end H's period at "l" (older than "h2"); a lower class waits instead.
    policy = RequestLevelPolicy(specs(H="high", L="low"), SLO)
    policy.add_instance(InstanceView("i0", weight_budget_bytes=100 * GB))
    policy.submit(request("h1", "H", 0.0), 0.0)
    policy.submit(request("l", "L", 1.0), 1.0)
    policy.submit(request("h2", "H", 2.0), 2.0)
    assert policy.admissible("i0", ("H", 0.0), 3.0) == ["h1", "h2"]
    policy.max_wait_s = 1.5  # "l" starves: H's later arrivals wait behind it
    assert policy.admissible("i0", ("H", 0.0), 3.0) == ["h1"]


# ---------------------------------------------------------------- aegaeon


def aegaeon(**classes: str) -> AegaeonPolicy:
    policy = AegaeonPolicy(specs(**classes), SLO, FixedCosts())
    policy.add_instance(InstanceView("p0", role="prefill"))
    return policy


def test_aegaeon_prefills_the_higher_class_group_first_then_fcfs():
    policy = aegaeon(L="low", N="normal", H="high")
    for rid, model, t in [("l", "L", 0.0), ("n", "N", 0.1), ("h", "H", 0.2), ("n2", "N", 0.3)]:
        policy.submit(request(rid, model, t), t)
    order = [g.model for g in policy.lanes["p0"].groups]
    assert order == ["H", "N", "L"]  # "n2" joined N's group


def test_aegaeon_puts_a_group_past_the_maximum_wait_first():
    policy = aegaeon(L="low", H="high")
    policy.max_wait_s = 5.0
    policy.submit(request("l", "L", 0.0), 0.0)
    policy.submit(request("h", "H", 1.0), 1.0)
    assert policy.next_turn("p0", 2.0).model == "H"  # type: ignore[union-attr]
    policy.instances["p0"].busy = False
    policy.submit(request("h2", "H", 3.0), 3.0)
    assert policy.next_turn("p0", 5.5).model == "L"  # type: ignore[union-attr]


def test_with_one_class_aegaeon_groups_stay_first_come_first_served():
    policy = aegaeon(A="low", B="low")
    policy.max_wait_s = 0.0
    policy.submit(request("b", "B", 0.0), 0.0)
    policy.submit(request("a", "A", 1.0), 1.0)
    assert [g.model for g in policy.lanes["p0"].groups] == ["B", "A"]
    assert policy.next_turn("p0", 9.0).model == "B"  # type: ignore[union-attr]


def test_aegaeon_weights_decode_quotas_by_class():
    def quotas(**classes: str) -> list[float]:
        policy = AegaeonPolicy(specs(**classes), SLO, FixedCosts())
        policy.add_instance(InstanceView("d0", role="decode"))
        for rid, model in [("a", "A"), ("b", "B")]:
            r = request(rid, model, 0.0)
            r.prefilled, r.generated = True, 1
            policy.requests[rid] = r
            policy._place_for_decode(r, "d0")
        return policy._round_quotas(policy.lanes["d0"])[0]

    even = quotas(A="normal", B="normal")
    assert even[0] == pytest.approx(even[1])
    weighted = quotas(A="high", B="low")
    assert weighted[0] == pytest.approx(4 * weighted[1])  # weights 2 and 0.5, same ratio capped


# ---------------------------------------------------------------- simulated


def saturating_trace() -> list[TraceRequest]:
    """A high-class model whose requests alone keep the one instance busy, and a low-class
    model's few requests arriving among them."""
    trace = [TraceRequest(f"h{i}", "H", 0.25 * i, 64, 60) for i in range(160)]
    trace += [TraceRequest(f"l{i}", "L", 2.0 + 8.0 * i, 64, 20) for i in range(4)]
    return sorted(trace, key=lambda r: r.arrival)


def first_token_waits(max_wait_s: float) -> dict[str, float]:
    profile = ModelProfile(
        prefill=(0.02, 0.0, 0.0), decode=(0.02, 0.0, 0.0), switch_fixed_s=0.3,
        link_bytes_per_s=1e30, weight_bytes=GB, kv_bytes_per_token=0,
    )  # fmt: skip
    cost = Estimator({"H": profile, "L": profile})
    policy = SllmPlusPolicy(specs(H="high", L="low"), Slo(ttft_s=4.0, tbt_s=0.1), cost)
    policy.max_wait_s = max_wait_s
    instance = InstanceView("i0", kv_capacity_tokens=1 << 20, weight_budget_bytes=2 * GB)
    result = simulate(saturating_trace(), policy, [instance], cost, Slo(4.0, 0.1), drain_s=600.0)
    waits = {}
    for record in result.records:
        if record.request_id.startswith("l") and record.token_times:
            waits[record.request_id] = record.token_times[0] - record.arrival
    return waits


def test_in_simulation_a_low_class_first_token_comes_within_the_maximum_wait_under_load():
    waits = first_token_waits(max_wait_s=3.0)
    assert len(waits) == 4
    # Past its maximum wait a request goes at the next turn boundary: the wait is bounded by
    # the maximum wait plus one turn of the high class (≤ its 60 tokens) and the switch.
    assert max(waits.values()) <= 3.0 + 60 * 0.02 + 0.3 + 0.5
    # Without the bound the low class waits for a gap in the high class's work.
    assert max(first_token_waits(max_wait_s=1e9).values()) > max(waits.values()) + 5.0


# ---------------------------------------------------------------- pinning


def pinned_policy(pin: int, instances: int = 3) -> AegaeonPolicy:
    models = specs(P="normal", A="normal", B="normal")
    models["P"].pin = pin
    policy = AegaeonPolicy(models, SLO, FixedCosts())
    for i in range(instances):
        policy.add_instance(InstanceView(f"i{i}"))
    return policy


def test_a_pinned_model_is_served_on_its_instances_which_keep_it_in_a_slot():
    policy = pinned_policy(pin=1)
    assert policy.pins == {"i0": "P"}
    policy.submit(request("p", "P", 0.0), 0.0)
    assert policy.requests["p"].instance_id == "i0"
    plan = policy.next_turn("i0", 0.0)
    assert plan is not None and (plan.model, plan.pinned) == ("P", "P")
    policy.submit(request("a", "A", 0.1), 0.1)
    plan = policy.next_turn(policy.requests["a"].instance_id, 0.1)
    assert plan is not None and plan.model == "A"
    if plan.instance_id == "i0":
        assert plan.pinned == "P"


def test_an_instance_pinned_while_on_another_model_stages_the_pinned_one_back():
    policy = pinned_policy(pin=1, instances=1)
    policy.submit(request("a", "A", 0.0), 0.0)
    plan = policy.next_turn("i0", 0.0)
    assert plan is not None and (plan.model, plan.pinned, plan.prefetch_model) == ("A", "P", "P")


def test_pins_stay_where_they_are_and_move_when_an_instance_leaves():
    policy = pinned_policy(pin=2)
    assert policy.pins == {"i0": "P", "i1": "P"}
    policy.add_instance(InstanceView("i3", resident_model="P"))
    assert policy.pins == {"i0": "P", "i1": "P"}  # no churn
    policy.remove_instance("i0")
    assert policy.pins == {"i1": "P", "i3": "P"}  # the one already holding it first


def test_in_simulation_a_pinned_model_is_never_copied_again_through_a_burst_of_others():
    profile = ModelProfile(
        prefill=(0.02, 0.0, 0.0), decode=(0.01, 0.0, 0.0), switch_fixed_s=0.01,
        link_bytes_per_s=float(GB), weight_bytes=GB, kv_bytes_per_token=0,
    )  # fmt: skip
    names = ("P", "A", "B", "C")
    cost = Estimator(dict.fromkeys(names, profile))
    trace = [TraceRequest("p0", "P", 0.0, 16, 10)]
    trace += [TraceRequest(f"x{i}", names[1 + i % 3], 1.0 + 0.05 * i, 16, 10) for i in range(30)]
    trace += [TraceRequest("p1", "P", 5.0, 16, 10)]

    class Observing(Estimator):
        """The policy's cost model, recording each switch the simulator reports to it."""

        def __init__(self) -> None:
            super().__init__(dict.fromkeys(names, profile))
            self.copied: list[tuple[str, int]] = []

        def observe_switch(self, model, exposed_s, copied_bytes, prefetched_bytes):
            self.copied.append((model, copied_bytes + prefetched_bytes))

    def copies_of_p(pin: int) -> int:
        models = {m: ModelSpec(m, GB, 0, pin=pin if m == "P" else 0) for m in names}
        seen = Observing()
        policy = AegaeonPolicy(models, Slo(4.0, 0.1), seen)
        instance = InstanceView("i0", kv_capacity_tokens=1 << 20, weight_budget_bytes=2 * GB)
        result = simulate(trace, policy, [instance], cost, Slo(4.0, 0.1), drain_s=60.0)
        assert all(r.finished for r in result.records)
        return sum(1 for model, copied in seen.copied if model == "P" and copied > 0)

    assert copies_of_p(pin=1) == 1  # its first load only
    assert copies_of_p(pin=0) > 1


def test_a_removed_pinned_model_is_kept_nowhere():
    policy = pinned_policy(pin=1)
    assert policy.pins == {"i0": "P"}
    policy.remove_model("P")
    assert policy.pins == {} and "P" not in policy.models
