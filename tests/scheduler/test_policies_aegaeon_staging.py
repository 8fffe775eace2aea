"""The aegaeon policy's books of both weight slots: what each turn leaves in the other slot,
placement that counts a switch to it as a rebind, and staging on an instance left idle."""

from __future__ import annotations

from aegaeon.scheduler.policies.aegaeon import AegaeonPolicy
from aegaeon.scheduler.policies.aegaeon_lanes import switch_slots
from aegaeon.scheduler.policies.base import InstanceView, ModelSpec, TurnResult
from aegaeon.scheduler.policies.demand import DEMAND_HALF_LIFE_S, Demand
from fixed_costs import FixedCosts
from test_policies_aegaeon import SLO, make_policy, request


def serve(policy: AegaeonPolicy, rid: str, model: str, now: float, instance: str = "i0") -> None:
    """Submit one request and run the instance's turns until it finished (each turn 0.1 s)."""
    policy.submit(request(rid, model, arrival=now), now)
    assert policy.requests[rid].instance_id == instance
    for _ in range(10):
        plan = policy.next_turn(instance, now)
        if plan is None:
            return
        now += 0.1
        done = [rid] if not plan.prefill_only else []
        result = TurnResult(steps=1, elapsed_s=0.1, generated={rid: 1}, finished=done)
        policy.turn_done(instance, plan, result, now)
    raise AssertionError(f"{rid} never finished")


def test_a_switch_leaves_the_model_before_it_in_the_other_slot():
    policy = make_policy("both")
    serve(policy, "a0", "A", 0.0)
    assert policy.lanes["i0"].standby is None
    serve(policy, "b0", "B", 1.0)
    assert (policy.instances["i0"].resident_model, policy.lanes["i0"].standby) == ("B", "A")
    serve(policy, "a1", "A", 2.0)  # back to A: a rebind, B now waits in the other slot
    assert (policy.instances["i0"].resident_model, policy.lanes["i0"].standby) == ("A", "B")


def test_the_slot_walk_follows_the_engine():
    assert switch_slots("A", "B", "A", None) == ("A", "B")  # no switch: nothing moves
    assert switch_slots("A", "B", "C", None) == ("C", "A")  # C is copied over B
    assert switch_slots("A", "P", "C", "P") == ("C", "P")  # the pinned model keeps its slot
    assert switch_slots(None, "S", "C", None) == ("C", "S")  # nothing resident: an empty slot


def test_the_model_staged_during_a_turn_takes_the_other_slot():
    policy = make_policy("both")
    serve(policy, "a0", "A", 0.0)
    policy.submit(request("b0", "B", arrival=1.0), 1.0)
    prefill = policy.next_turn("i0", 1.0)
    assert prefill is not None and prefill.model == "B"
    policy.submit(request("c0", "C", arrival=1.05), 1.05)
    assert policy.prefetch_now("i0") == "C"  # restaged while B's turn runs
    policy.turn_done("i0", prefill, TurnResult(steps=1, elapsed_s=0.1, generated={"b0": 1}), 1.1)
    assert policy.lanes["i0"].standby == "C"


def test_a_request_goes_to_the_idle_instance_holding_its_model_in_the_other_slot():
    """Both idle and both must leave their resident model; i1 still holds A in its other slot,
    so A's request goes there (a rebind) rather than to the first listed (a copy)."""
    policy = make_policy("both", "both")
    policy.instances["i0"].resident_model = "C"
    policy.instances["i1"].resident_model = "B"
    policy.lanes["i1"].standby = "A"
    policy.submit(request("a0", "A"), now=0.0)
    assert policy.requests["a0"].instance_id == "i1"
    plan = policy.next_turn("i1", 0.0)
    assert plan is not None and plan.model == "A"
    assert policy.lanes["i1"].busy_until == policy.est.prefill_time("A", [10])  # no switch


def test_an_idle_instance_stages_the_most_wanted_model_no_instance_holds():
    policy = make_policy("both")
    serve(policy, "c0", "C", 0.0)
    serve(policy, "c1", "C", 1.0)
    serve(policy, "a0", "A", 2.0)
    assert policy.prefetch_now("i0") is None  # holds C and A: B was never asked for
    serve(policy, "b0", "B", 3.0)  # its copy overwrote C's slot: holds B and A
    assert policy.prefetch_now("i0") == "C"  # asked twice, A once: C replaces A
    assert policy.lanes["i0"].standby == "C"
    assert policy.prefetch_now("i0") is None  # once per idle spell
    policy.submit(request("c2", "C", arrival=4.0), 4.0)
    plan = policy.next_turn("i0", 4.0)
    assert plan is not None and plan.model == "C"
    assert policy.lanes["i0"].busy_until == 4.0 + policy.est.prefill_time("C", [10])  # a rebind


def test_an_idle_instance_keeps_a_model_wanted_more_than_the_one_it_would_stage():
    policy = make_policy("both")
    serve(policy, "a0", "A", 0.0)
    serve(policy, "b0", "B", 1.0)
    serve(policy, "b1", "B", 2.0)
    serve(policy, "c0", "C", 3.0)  # holds C and B; A (asked once) would cost B (asked twice)
    assert policy.prefetch_now("i0") is None
    assert policy.lanes["i0"].standby == "B"


def test_a_model_another_instance_holds_is_not_staged():
    policy = make_policy("both", "both")
    policy.instances["i1"].resident_model = "C"
    policy.demand.arrived("C", 0.0)
    policy.demand.arrived("C", 0.0)
    serve(policy, "a0", "A", 0.0)
    serve(policy, "b0", "B", 1.0)  # i0 holds B and A, i1 C: every model asked for is at hand
    assert policy.prefetch_now("i0") is None


def test_a_pinned_instance_never_stages():
    policy = AegaeonPolicy(
        {n: ModelSpec(n, 1 << 30, 1024, pin=1 if n == "P" else 0) for n in "ABP"}, SLO, FixedCosts()
    )
    policy.add_instance(InstanceView("i0", role="both"))
    serve(policy, "a0", "A", 0.0)
    serve(policy, "b0", "B", 1.0)
    assert policy.lanes["i0"].standby == "P"  # the pinned model holds the other slot
    serve(policy, "a1", "A", 2.0)
    assert policy.prefetch_now("i0") is None


def test_an_evicted_model_is_neither_at_hand_nor_staged():
    policy = make_policy("both")
    serve(policy, "a0", "A", 0.0)
    serve(policy, "b0", "B", 1.0)
    policy.weights_evicted("A")
    assert policy.lanes["i0"].standby is None and policy.demand.of("A") == 0.0
    serve(policy, "c0", "C", 2.0)
    assert policy.prefetch_now("i0") is None  # A is not asked for since its eviction


def test_demand_halves_every_half_life():
    demand = Demand()
    demand.arrived("A", 0.0)
    demand.arrived("B", DEMAND_HALF_LIFE_S)
    assert demand.of("A") == 0.5 and demand.of("B") == 1.0
