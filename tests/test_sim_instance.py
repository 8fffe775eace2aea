"""The simulator's instance: one turn's control round trip, switch, prefill and decode against a
cost model; the engine's weight slots, a prefetch racing a turn, the host link a KV swap shares."""

from __future__ import annotations

import pytest
from aegaeon.scheduler.estimators import Estimator, ModelProfile
from aegaeon.scheduler.policies.base import InstanceView, TurnPlan

from aegaeon.sim.instance import SimInstance, SimRequest
from aegaeon.workload import TraceRequest


def flat_cost() -> Estimator:
    """Decode 10 ms/step, prefill 50 ms, switch 1 s, KV moves free."""
    profile = ModelProfile(
        prefill=(0.05, 0.0, 0.0),
        decode=(0.01, 0.0, 0.0),
        switch_fixed_s=1.0,
        link_bytes_per_s=1e30,
        weight_bytes=1 << 30,
        kv_bytes_per_token=0,
    )
    return Estimator({"A": profile, "B": profile})


def sim_requests(*specs: tuple[str, str, int]) -> dict[str, SimRequest]:
    return {rid: SimRequest(TraceRequest(rid, model, 0.0, 10, out)) for rid, model, out in specs}


def copy_cost() -> Estimator:
    """Switch = 0.05 s rebind + 1 s copy (1 GiB at 1 GiB/s); KV moves 1 s per 1024 tokens."""
    profile = ModelProfile(
        prefill=(0.05, 0.0, 0.0),
        decode=(0.01, 0.0, 0.0),
        switch_fixed_s=0.05,
        link_bytes_per_s=float(1 << 30),
        weight_bytes=1 << 30,
        kv_bytes_per_token=1 << 20,
    )
    return Estimator({"A": profile, "B": profile, "C": profile})


def instance(cost=None, budget=1 << 40, **options) -> SimInstance:
    options.setdefault("control_s", 0.0)
    return SimInstance(InstanceView("g0", weight_budget_bytes=budget), cost or flat_cost(),
                       **options)  # fmt: skip


def test_a_turn_pays_the_switch_then_prefills_then_decodes():
    inst = instance()
    reqs = sim_requests(("r", "A", 5))
    end, result = inst.execute(TurnPlan("g0", "A", ["r"], quota_s=10.0), reqs, now=0.0)
    assert result.switch_s == 1.0
    assert list(reqs["r"].times) == pytest.approx([1.05, 1.06, 1.07, 1.08, 1.09])
    assert result.finished == ["r"] and end == pytest.approx(1.09)


def test_every_turn_pays_one_control_round_trip_before_it_starts():
    inst = instance(control_s=0.02)
    reqs = sim_requests(("r", "A", 2), ("s", "A", 2))
    inst.execute(TurnPlan("g0", "A", ["r"], quota_s=10.0), reqs, now=0.0)
    end, result = inst.execute(TurnPlan("g0", "A", ["s"], quota_s=10.0), reqs, now=5.0)
    assert list(reqs["s"].times) == pytest.approx([5.07, 5.08])  # 0.02 + prefill 0.05
    assert end == pytest.approx(5.08) and result.elapsed_s == pytest.approx(0.06)


def test_the_current_model_switches_for_free():
    inst = instance()
    reqs = sim_requests(("r", "A", 3), ("s", "A", 3))
    inst.execute(TurnPlan("g0", "A", ["r"], quota_s=10.0), reqs, 0.0)
    _, result = inst.execute(TurnPlan("g0", "A", ["s"], quota_s=10.0), reqs, 5.0)
    assert result.switch_s == 0.0


def test_decode_stops_when_the_quota_is_spent():
    inst = instance()
    reqs = sim_requests(("r", "A", 1000))
    _, result = inst.execute(TurnPlan("g0", "A", ["r"], quota_s=0.1), reqs, 0.0)
    # 0.1 s of 10 ms steps after the switch and prefill: 10 decode steps + the prefill token
    assert result.steps == 10 and reqs["r"].generated == 11


def test_dropped_kv_is_recomputed_by_a_prefill_that_yields_the_next_token():
    inst = instance(copy_cost())  # KV would move 1 s per 1024 tokens: a swap-in is not free
    reqs = sim_requests(("r", "A", 10), ("s", "B", 1))
    inst.execute(TurnPlan("g0", "A", ["r"], quota_s=10.0, max_steps=3), reqs, 0.0)
    assert reqs["r"].generated == 4
    inst.execute(TurnPlan("g0", "B", ["s"], quota_s=10.0, drop_kv=["r"]), reqs, 10.0)
    end, _ = inst.execute(TurnPlan("g0", "A", ["r"], quota_s=10.0, max_steps=0), reqs, 20.0)
    # A is still in a slot: rebind (0.05), then the recompute prefill (0.05) gives token 5
    assert reqs["r"].generated == 5 and reqs["r"].times[4] == pytest.approx(20.1)
    assert end == pytest.approx(20.1) and inst.kv_move_s == 0.0  # no KV swapped in


def run_models(inst, models, start=0.0):
    """One short turn per model in order; the switch time of each."""
    reqs = sim_requests(*((f"r{i}", m, 1) for i, m in enumerate(models)))
    out = []
    for i, model in enumerate(models):
        _, result = inst.execute(TurnPlan("g0", model, [f"r{i}"], 1.0), reqs, start + 10.0 * i)
        out.append(result.switch_s)
    return out


def test_the_engine_holds_two_models_in_its_slots_however_small_they_are():
    # A byte budget would hold all three; the engine's two slots hold A and B, and C's copy
    # overwrites the slot the running model B does not use (A's).
    inst = instance(copy_cost(), budget=1 << 40)
    switches = run_models(inst, ["A", "B", "C", "B", "A"])
    assert switches == pytest.approx([1.05, 1.05, 1.05, 0.05, 1.05])
    assert list(inst.residency.models) == ["B", "A"]


def test_a_byte_budget_keeps_every_model_that_fits():
    inst = instance(copy_cost(), budget=3 << 30, slots=None)
    assert run_models(inst, ["A", "B", "C", "A"]) == pytest.approx([1.05, 1.05, 1.05, 0.05])


def test_a_one_slot_instance_copies_every_switch_and_never_prefetches():
    inst = instance(copy_cost(), slots=1)
    reqs = sim_requests(("r", "A", 1000), ("s", "B", 1), ("t", "A", 1))
    end, _ = inst.execute(TurnPlan("g0", "A", ["r"], 5.0, prefetch_model="B"), reqs, 0.0)
    _, result = inst.execute(TurnPlan("g0", "B", ["s"], 1.0), reqs, end)
    assert result.switch_s == pytest.approx(1.05)
    _, result = inst.execute(TurnPlan("g0", "A", ["t"], 1.0), reqs, end + 10)
    assert result.switch_s == pytest.approx(1.05)


def test_a_prefetched_model_waits_only_for_the_rest_of_its_copy():
    inst = instance(copy_cost())
    reqs = sim_requests(("r", "A", 1000), ("s", "B", 5), ("t", "C", 1000), ("u", "A", 1))
    # A's turn: switch 1.05 s, then B copies in the background from 1.05 while A decodes.
    end, _ = inst.execute(TurnPlan("g0", "A", ["r"], 0.6, prefetch_model="B"), reqs, 0.0)
    _, result = inst.execute(TurnPlan("g0", "B", ["s"], 1.0), reqs, end)
    assert result.switch_s == pytest.approx(0.05 + (2.05 - end), abs=1e-9)
    assert inst.last_switch.copied_bytes + inst.last_switch.prefetched_bytes == 1 << 30
    assert inst.last_switch.prefetched_bytes > 0.5 * (1 << 30)
    # A copy that has finished costs only the rebind.
    inst.execute(TurnPlan("g0", "C", ["t"], 3.0, prefetch_model="A"), reqs, 10.0)
    _, result = inst.execute(TurnPlan("g0", "A", ["u"], 1.0), reqs, 20.0)
    assert result.switch_s == pytest.approx(0.05)
    assert (inst.last_switch.copied_bytes, inst.last_switch.prefetched_bytes) == (0, 1 << 30)


def swap_in_with_prefetch(contention: bool) -> tuple[float, float]:
    """A turn whose swap-in (1 s alone) runs while B is prefetched (1 s alone): (the swap-in's
    duration, the switch time B's turn then waits at t = 1.2 s after A's switch)."""
    inst = instance(copy_cost(), contention=contention)
    reqs = sim_requests(("r", "A", 2000), ("s", "B", 1))
    inst.residency.admit("A", 1 << 30)
    inst.current = "A"
    reqs["r"].generated, reqs["r"].kv_on = 1014, None  # 10 + 1014 tokens on the host: 1 s
    plan = TurnPlan("g0", "A", ["r"], quota_s=0.0, max_steps=1, prefetch_model="B")
    end, _ = inst.execute(plan, reqs, 0.0)
    swap_in = end - 0.01  # one 10 ms decode step after it
    _, result = inst.execute(TurnPlan("g0", "B", ["s"], 1.0), reqs, 1.2)
    return swap_in, result.switch_s


def test_a_kv_swap_and_a_prefetch_share_the_host_link_and_slow_each_other():
    alone_swap, alone_switch = swap_in_with_prefetch(contention=False)
    assert alone_swap == pytest.approx(1.0)
    assert alone_switch == pytest.approx(0.05)  # the copy ended at 1.0
    shared_swap, shared_switch = swap_in_with_prefetch(contention=True)
    # Both at half speed for 2 s: the swap takes 2 s, the copy ends at 2.0, not 1.0.
    assert shared_swap == pytest.approx(2.0)
    assert shared_switch == pytest.approx(0.05 + 0.8)
