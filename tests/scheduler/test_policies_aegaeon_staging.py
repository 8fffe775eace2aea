"""The aegaeon policy's books of both weight slots: what each turn leaves in the other slot,
placement that counts a switch to it as a rebind, staging on an instance left idle, and
restaging a busy instance's prefetch when an arrival changes its next switch."""

from __future__ import annotations

from aegaeon.scheduler.policies.aegaeon import AegaeonPolicy
from aegaeon.scheduler.policies.aegaeon_lanes import switch_slots
from aegaeon.scheduler.policies.base import InstanceView, ModelSpec, TurnPlan, TurnResult
from aegaeon.scheduler.policies.demand import DEMAND_HALF_LIFE_S, Demand
from fixed_costs import FixedCosts
from test_policies_aegaeon import SLO, finish_prefill, make_policy, request


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


# ---------------------------------------------------------------- restaging the prefetch


def decoding_alone(policy: AegaeonPolicy, model: str = "A") -> TurnPlan:
    """The "both" instance i0 prefills one request of ``model``, then starts decoding it."""
    policy.submit(request("a0", model), now=0.0)
    prefill = policy.next_turn("i0", 0.0)
    assert prefill is not None and prefill.prefill_only
    finish_prefill(policy, prefill, now=0.2)
    plan = policy.next_turn("i0", 0.2)
    assert plan is not None and not plan.prefill_only and plan.prefetch_model is None
    return plan


def test_an_arrival_of_another_model_restages_the_busy_instance_once():
    policy = make_policy("both")
    running = decoding_alone(policy)
    assert policy.prefetch_now("i0") is None  # nothing else to run
    policy.submit(request("b0", "B", arrival=0.3), now=0.3)
    assert policy.prefetch_now("i0") == "B"
    assert policy.prefetch_now("i0") is None  # already staged
    policy.submit(request("a1", "A", arrival=0.4), now=0.4)  # joins the running model's batch
    assert policy.prefetch_now("i0") is None
    done = TurnResult(steps=5, elapsed_s=0.05, generated={"a0": 6})
    policy.turn_done("i0", running, done, 0.5)
    assert policy.prefetch_now("i0") is None  # idle: the next plan names its own prefetch
    nxt = policy.next_turn("i0", 0.5)
    assert nxt is not None and nxt.model == "B"  # the switch the restaging prepared


def test_the_restaged_model_is_the_turn_next_turn_then_chooses():
    """A batch of B due before C's group's first token: B decodes next, so B is staged; once
    the C group is due first (the batches are far ahead of schedule), C is."""
    policy = make_policy("both")
    policy.submit(request("a0", "A"), now=0.0)
    policy.submit(request("b0", "B"), now=0.0)
    for _ in range(2):  # both prefilled, each into its own batch
        plan = policy.next_turn("i0", 0.0)
        assert plan is not None and plan.prefill_only
        finish_prefill(policy, plan, now=0.1)
    running = policy.next_turn("i0", 0.1)
    assert running is not None and not running.prefill_only
    other = "B" if running.model == "A" else "A"
    assert running.prefetch_model == other
    policy.submit(request("c0", "C", arrival=0.2), now=0.2)
    assert policy.prefetch_now("i0") is None  # the other batch is due first: no change
    lane = policy.lanes["i0"]
    for batch in lane.batches:  # far ahead: their next tokens are due after C's first
        for rid in batch.request_ids:
            policy.requests[rid].generated = 1000
    assert policy.prefetch_now("i0") == "C"
    done = TurnResult(steps=1, elapsed_s=0.01, generated={r: 1000 for r in running.request_ids})
    policy.turn_done("i0", running, done, 0.3)
    nxt = policy.next_turn("i0", 0.3)
    assert nxt is not None and (nxt.model, nxt.prefill_only) == ("C", True)
