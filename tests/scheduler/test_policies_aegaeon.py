"""AegaeonPolicy without a device: hand-built requests and turn results, asserted decisions."""

from __future__ import annotations

import pytest
from aegaeon.scheduler.policies.aegaeon import GROUP_CAP, AegaeonPolicy
from aegaeon.scheduler.policies.aegaeon_lanes import DecodeBatch
from aegaeon.scheduler.policies.base import (
    InstanceView,
    ModelSpec,
    RequestView,
    Slo,
    TurnPlan,
    TurnResult,
)
from aegaeon.scheduler.policies.quota import (
    ALPHA_FLOOR,
    QMAX_S,
    cyclic_switch_costs,
    exposed_switch_costs,
    round_quotas,
)
from fixed_costs import FixedCosts

SLO = Slo(ttft_s=10.0, tbt_s=0.1)


def models(*names: str) -> dict[str, ModelSpec]:
    return {n: ModelSpec(n, weight_bytes=1 << 30, kv_bytes_per_token=1024) for n in names}


def make_policy(*roles: str, names: tuple[str, ...] = ("A", "B", "C")) -> AegaeonPolicy:
    policy = AegaeonPolicy(models(*names), SLO, FixedCosts())
    for i, role in enumerate(roles):
        policy.add_instance(InstanceView(f"i{i}", role=role))  # type: ignore[arg-type]
    return policy


def request(rid: str, model: str, arrival: float = 0.0, prompt: int = 10, out: int = 50):
    return RequestView(rid, model, prompt, out, arrival)


def finish_prefill(policy: AegaeonPolicy, plan: TurnPlan, now: float = 1.0) -> None:
    result = TurnResult(steps=1, elapsed_s=0.1, generated=dict.fromkeys(plan.request_ids, 1))
    policy.turn_done(plan.instance_id, plan, result, now)


# ---------------------------------------------------------------- quota arithmetic


def test_quotas_follow_the_formula_below_the_alpha_floor():
    # n = [5, 10], S = 0.3, α = max(1/(5·4) + 0.3, 0.5) = 0.5, q_i = 1 / (n_i · 0.2)
    alpha, quotas = round_quotas([0.02, 0.01], round_switch_s=1.0, tbt_s=0.1)
    assert alpha == ALPHA_FLOOR
    assert quotas == pytest.approx([1.0, 0.5])


def test_alpha_above_one_signals_overload_and_caps_quotas_at_qmax():
    # n = [2, 2], S = 1, α = 2/(2·4) + 1 = 1.25, q = 2 / (2 · 0.25) = 4 = QMAX
    alpha, quotas = round_quotas([0.05, 0.05], round_switch_s=2.0, tbt_s=0.1)
    assert alpha == pytest.approx(1.25)
    assert quotas == pytest.approx([QMAX_S, QMAX_S])


def test_each_batch_gets_one_over_alpha_of_the_tokens_its_slo_asks_for():
    steps, c, tbt = [0.02, 0.03, 0.01], 0.9, 0.1
    alpha, quotas = round_quotas(steps, c, tbt)
    round_s = c + sum(quotas)
    for t, q in zip(steps, quotas, strict=True):
        assert (q / t) / (round_s / tbt) == pytest.approx(1 / alpha)


def test_a_round_without_switches_gets_the_longest_quota():
    _, quotas = round_quotas([0.01], round_switch_s=0.0, tbt_s=0.1)
    assert quotas == [QMAX_S]


def test_neighbouring_batches_of_one_model_pay_no_switch():
    costs = cyclic_switch_costs(["A", "A", "B"], {"A": 1.0, "B": 2.0})
    assert costs == [1.0, 0.0, 2.0]


def test_prefetch_hides_the_switch_behind_the_previous_quota():
    costs = exposed_switch_costs(["A", "B"], {"A": 1.0, "B": 1.0}, quotas=[0.7, 3.0])
    assert costs[1] == pytest.approx(0.3)  # B's load overlapped A's 0.7 s turn
    assert costs[0] == pytest.approx(0.15)  # only the unhidable part remains


# ---------------------------------------------------------------- Algorithm 1


def test_requests_of_one_model_join_the_same_queued_group():
    policy = make_policy("prefill", "decode")
    for i in range(3):
        policy.submit(request(f"a{i}", "A", arrival=i), now=i)
    groups = policy.lanes["i0"].groups
    assert [g.request_ids for g in groups] == [["a0", "a1", "a2"]]


def test_a_full_group_starts_a_new_one():
    policy = make_policy("prefill", "decode")
    for i in range(GROUP_CAP + 1):
        policy.submit(request(f"a{i}", "A"), now=0.0)
    sizes = [len(g.request_ids) for g in policy.lanes["i0"].groups]
    assert sizes == [GROUP_CAP, 1]


def test_a_new_group_goes_to_the_instance_that_finishes_it_first():
    policy = make_policy("prefill", "prefill", "decode")
    policy.submit(request("a0", "A"), now=0.0)
    policy.submit(request("b0", "B"), now=0.0)
    assert policy.requests["a0"].instance_id != policy.requests["b0"].instance_id


def test_a_group_for_the_resident_model_is_cheaper_than_a_switch():
    policy = make_policy("prefill", "prefill", "decode")
    policy.instances["i1"].resident_model = "B"
    policy.submit(request("b0", "B"), now=0.0)
    assert policy.requests["b0"].instance_id == "i1"


def test_a_prefill_turn_runs_one_group_and_prefetches_the_next_groups_model():
    policy = make_policy("prefill", "decode")
    policy.submit(request("a0", "A"), now=0.0)
    policy.submit(request("b0", "B"), now=0.0)
    plan = policy.next_turn("i0", now=0.0)
    assert plan is not None
    assert (plan.model, plan.request_ids, plan.prefill_only) == ("A", ["a0"], True)
    assert plan.prefetch_model == "B"


def test_a_prefill_turn_hands_each_request_to_a_decode_instance():
    policy = make_policy("prefill", "decode", "decode")
    policy.submit(request("a0", "A"), now=0.0)
    plan = policy.next_turn("i0", now=0.0)
    assert plan is not None
    assert plan.handoff["a0"] in {"i1", "i2"}
    finish_prefill(policy, plan)
    target = plan.handoff["a0"]
    assert [b.request_ids for b in policy.lanes[target].batches] == [["a0"]]
    assert policy.requests["a0"].instance_id == target


def test_handoff_prefers_the_decode_instance_already_running_that_model():
    policy = make_policy("prefill", "decode", "decode")
    policy.submit(request("a0", "A"), now=0.0)
    first = policy.next_turn("i0", 0.0)
    assert first is not None
    finish_prefill(policy, first)
    policy.submit(request("a1", "A"), now=1.0)
    second = policy.next_turn("i0", 1.0)
    assert second is not None
    assert second.handoff["a1"] == first.handoff["a0"]


def test_handoff_keeps_the_kv_on_the_prefill_node_unless_another_node_has_room_for_it():
    policy = AegaeonPolicy(models("A", "B"), SLO, FixedCosts())
    for instance_id, role, node in [("p2", "prefill", "n2"), ("d1", "decode", "n1"),
                                    ("d2", "decode", "n2")]:  # fmt: skip
        policy.add_instance(InstanceView(instance_id, role=role, node=node))  # type: ignore[arg-type]
    policy.submit(request("a0", "A"), now=0.0)
    first = policy.next_turn("p2", 0.0)
    assert first is not None
    assert first.handoff == {"a0": "d2"}  # d1 comes first and is as loaded: the node decides
    finish_prefill(policy, first)
    # d1 holds a batch of B with room, d2 has only A's: B's next request decodes on d1.
    policy.lanes["d1"].batches.append(DecodeBatch("B", ["b9"]))
    policy.submit(request("b0", "B"), now=1.0)
    second = policy.next_turn("p2", 1.0)
    assert second is not None
    assert second.handoff == {"b0": "d1"}


# ---------------------------------------------------------------- Algorithm 2


def decode_ready(policy: AegaeonPolicy, *specs: tuple[str, str]) -> None:
    """Prefill each (request id, model) on i0 and hand it to the decode instance i1."""
    for rid, model in specs:
        policy.submit(request(rid, model), now=0.0)
        plan = policy.next_turn("i0", 0.0)
        assert plan is not None
        finish_prefill(policy, plan)


def test_decode_turn_gets_the_formula_quota_and_sets_last_alpha():
    policy = make_policy("prefill", "decode")
    decode_ready(policy, ("a0", "A"), ("b0", "B"))
    plan = policy.next_turn("i1", 1.0)
    assert plan is not None and not plan.prefill_only
    # Two batches, 10 ms steps: n = 10 each, S = 0.2. With prefetch the switch that remains
    # is what the previous quota did not hide; the quota solves that fixed point.
    alpha, quotas = round_quotas([0.01, 0.01], policy_c(policy), 0.1)
    assert policy.last_alpha == pytest.approx(alpha)
    assert plan.quota_s == pytest.approx(quotas[0])
    assert plan.swap_out_after  # another batch waits for the device
    assert plan.prefetch_model == "B"


def policy_c(policy: AegaeonPolicy) -> float:
    from aegaeon.scheduler.policies.quota import prefetched_round_quotas

    return prefetched_round_quotas(["A", "B"], [0.01, 0.01], {"A": 1.0, "B": 1.0}, 0.1)[2]


def test_a_round_visits_every_batch_once_in_rotation_order():
    policy = make_policy("prefill", "decode")
    decode_ready(policy, ("a0", "A"), ("b0", "B"), ("c0", "C"))
    seen = []
    for k in range(6):
        plan = policy.next_turn("i1", 1.0 + k)
        assert plan is not None
        seen.append(plan.model)
        done = TurnResult(steps=1, elapsed_s=0.1, generated={r: 2 for r in plan.request_ids})
        policy.turn_done("i1", plan, done, 1.0 + k)
    assert seen == ["A", "B", "C", "A", "B", "C"]


def test_a_lone_batch_does_not_swap_out():
    policy = make_policy("prefill", "decode")
    decode_ready(policy, ("a0", "A"))
    plan = policy.next_turn("i1", 1.0)
    assert plan is not None
    assert not plan.swap_out_after and plan.prefetch_model is None


def test_finished_requests_leave_their_batch():
    policy = make_policy("prefill", "decode")
    decode_ready(policy, ("a0", "A"), ("a1", "A"))
    plan = policy.next_turn("i1", 1.0)
    assert plan is not None and plan.request_ids == ["a0", "a1"]
    result = TurnResult(steps=49, elapsed_s=0.5, finished=["a0"], generated={"a0": 50, "a1": 50})
    policy.turn_done("i1", plan, result, 2.0)
    again = policy.next_turn("i1", 2.0)
    assert again is not None and again.request_ids == ["a1"]


def test_a_single_both_instance_prefills_then_decodes():
    policy = make_policy("both")
    policy.submit(request("a0", "A"), now=0.0)
    prefill = policy.next_turn("i0", 0.0)
    assert prefill is not None and prefill.prefill_only and not prefill.handoff
    finish_prefill(policy, prefill)
    decode = policy.next_turn("i0", 1.0)
    assert decode is not None and not decode.prefill_only
    assert decode.request_ids == ["a0"] and decode.quota_s > 0


def both_with_decoding_a0() -> AegaeonPolicy:
    policy = make_policy("both")
    policy.submit(request("a0", "A"), now=0.0)
    first = policy.next_turn("i0", 0.0)
    assert first is not None
    finish_prefill(policy, first)  # a0's second token is due at 0 + 10 + 0.1
    return policy


def next_kinds(policy: AegaeonPolicy, turns: int, now: float, tokens: int = 2) -> list[str]:
    kinds = []
    for k in range(turns):
        plan = policy.next_turn("i0", now + k)
        assert plan is not None
        kinds.append("prefill" if plan.prefill_only else "decode")
        done = TurnResult(steps=1, elapsed_s=0.1, generated=dict.fromkeys(plan.request_ids, tokens))
        policy.turn_done("i0", plan, done, now + k)
    return kinds


def test_a_both_instance_decodes_first_when_a_batch_is_due_before_a_group():
    policy = both_with_decoding_a0()
    policy.submit(request("b0", "B", arrival=1.0), now=1.0)  # first token due at 11.0
    # After its turn a0 is 40 tokens in: next due at 0 + 10 + 4.0, so b0 goes next.
    assert next_kinds(policy, 2, 1.0, tokens=41) == ["decode", "prefill"]


def test_a_both_instance_prefills_first_when_the_group_is_due_first():
    policy = both_with_decoding_a0()
    policy.submit(request("b0", "B", arrival=0.05), now=1.0)  # due at 10.05 < 10.1
    assert next_kinds(policy, 2, 1.0) == ["prefill", "decode"]


def test_a_request_for_a_model_decoding_on_a_both_instance_rides_its_next_turn():
    policy = both_with_decoding_a0()
    policy.submit(request("a1", "A", arrival=1.0), now=1.0)
    assert not policy.lanes["i0"].groups  # no group, no switch of its own
    plan = policy.next_turn("i0", 1.0)
    assert plan is not None and plan.request_ids == ["a0", "a1"] and not plan.prefill_only


def test_a_busy_instance_gets_no_turn():
    policy = make_policy("both")
    policy.submit(request("a0", "A"), now=0.0)
    assert policy.next_turn("i0", 0.0) is not None
    assert policy.next_turn("i0", 0.0) is None


def test_cancel_drops_a_queued_request_from_its_group():
    policy = make_policy("prefill", "decode")
    policy.submit(request("a0", "A"), now=0.0)
    policy.submit(request("a1", "A"), now=0.0)
    policy.cancel("a0")
    plan = policy.next_turn("i0", 0.0)
    assert plan is not None and plan.request_ids == ["a1"]


def test_cancel_forgets_a_request_waiting_for_an_instance():
    policy = make_policy()  # no instance yet
    for rid in ("a0", "a1"):
        policy.submit(request(rid, "A"), now=0.0)
    policy.cancel("a0")
    assert list(policy.unplaced) == ["a1"]
    policy.add_instance(InstanceView("i0", role="both"))
    plan = policy.next_turn("i0", 0.0)
    assert plan is not None and plan.request_ids == ["a1"]


def test_removing_an_instance_returns_the_requests_it_held():
    policy = make_policy("prefill", "decode")
    decode_ready(policy, ("a0", "A"))
    lost = policy.remove_instance("i1")
    assert [r.request_id for r in lost] == ["a0"]
    assert "i1" not in policy.lanes


def test_an_unknown_model_is_rejected_with_404():
    policy = make_policy("both")
    rejection = policy.submit(request("x", "nope"), now=0.0)
    assert rejection is not None and rejection.status == 404


def test_a_both_instance_keeps_a_round_within_half_the_ttft_target():
    class SlowSteps(FixedCosts):
        def decode_time(self, model: str, context_lens: list[int]) -> float:
            return 0.045  # S = 0.9 over two batches: the formula alone gives QMAX quotas

    policy = AegaeonPolicy(models("A", "B"), SLO, SlowSteps())
    policy.add_instance(InstanceView("i0", role="both"))
    for rid, model in (("a0", "A"), ("b0", "B")):
        policy.submit(request(rid, model), now=0.0)
        plan = policy.next_turn("i0", 0.0)
        assert plan is not None
        finish_prefill(policy, plan)
    quotas = []
    for k in range(2):
        plan = policy.next_turn("i0", 1.0 + k)
        assert plan is not None
        quotas.append(plan.quota_s)
        done = TurnResult(steps=1, elapsed_s=0.1, generated=dict.fromkeys(plan.request_ids, 2))
        policy.turn_done("i0", plan, done, 1.0 + k)
    assert sum(quotas) < 0.5 * SLO.ttft_s
    assert quotas[0] == pytest.approx(quotas[1])  # scaled together: equal steps, equal quotas
