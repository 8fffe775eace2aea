"""Aegaeon's decode rounds: quotas from measured exposed switch times, and the round cap."""

from __future__ import annotations

import pytest
from aegaeon.scheduler.policies.aegaeon import AegaeonPolicy
from aegaeon.scheduler.policies.base import InstanceView, ModelSpec, RequestView, Slo, TurnResult
from aegaeon.scheduler.policies.quota import (
    QMAX_S,
    ROUND_SHARE,
    capped_round,
    prefetched_round_quotas,
    qmax_for,
    round_quotas,
)

SLO = Slo(ttft_s=10.0, tbt_s=0.1)


class MeasuredCosts:
    """Decode 10 ms/step (or ``step_s``), prefill 100 ms, switch 1 s in full, and what
    workers reported."""

    def __init__(self, exposed: dict[str, float] | None = None, step_s: float = 0.01) -> None:
        self.exposed = exposed or {}
        self.step_s = step_s

    def prefill_time(self, model: str, prompt_lens: list[int]) -> float:
        return 0.1

    def decode_time(self, model: str, context_lens: list[int]) -> float:
        return self.step_s

    def switch_time(self, model: str) -> float:
        return 1.0

    def exposed_switch_time(self, model: str) -> float | None:
        return self.exposed.get(model)


def decoding(names: list[str], costs: MeasuredCosts) -> AegaeonPolicy:
    """A prefill instance i0 and a decode instance i1 decoding one request of each model."""
    policy = AegaeonPolicy({n: ModelSpec(n, 1 << 30, 1024) for n in names}, SLO, costs)
    policy.add_instance(InstanceView("i0", role="prefill"))
    policy.add_instance(InstanceView("i1", role="decode"))
    for name in names:
        policy.submit(RequestView(f"r-{name}", name, 10, 500, 0.0), now=0.0)
        plan = policy.next_turn("i0", 0.0)
        assert plan is not None
        done = TurnResult(steps=1, elapsed_s=0.1, generated=dict.fromkeys(plan.request_ids, 1))
        policy.turn_done("i0", plan, done, 0.5)
    return policy


def one_round(policy: AegaeonPolicy, batches: int) -> list[float]:
    quotas = []
    for k in range(batches):
        plan = policy.next_turn("i1", 1.0 + k)
        assert plan is not None
        quotas.append(plan.quota_s)
        done = TurnResult(steps=1, elapsed_s=0.1, generated=dict.fromkeys(plan.request_ids, 2))
        policy.turn_done("i1", plan, done, 1.0 + k)
    return quotas


def test_the_quota_uses_the_exposed_switch_times_workers_measured():
    policy = decoding(["A", "B"], MeasuredCosts({"A": 0.05, "B": 0.15}))
    plan = policy.next_turn("i1", 1.0)
    assert plan is not None
    alpha, quotas = round_quotas([0.01, 0.01], round_switch_s=0.05 + 0.15, tbt_s=0.1)
    assert plan.quota_s == pytest.approx(quotas[0])
    assert policy.last_alpha == pytest.approx(alpha)


def test_a_model_not_yet_measured_keeps_the_prefetch_model():
    measured = prefetched_round_quotas(["A", "B"], [0.01] * 2, {"A": 1.0, "B": 1.0}, 0.1,
                                       measured={"A": 0.05})  # fmt: skip
    modelled = prefetched_round_quotas(["A", "B"], [0.01] * 2, {"A": 1.0, "B": 1.0}, 0.1)
    # B's share of c still comes from the fixed point; only A's is replaced by its measure.
    assert 0.05 < measured[2] < modelled[2]


def test_a_slower_measured_switch_lengthens_the_quota():
    fast = decoding(["A", "B"], MeasuredCosts({"A": 0.05, "B": 0.05}))
    slow = decoding(["A", "B"], MeasuredCosts({"A": 0.5, "B": 0.5}))
    fast_plan, slow_plan = fast.next_turn("i1", 1.0), slow.next_turn("i1", 1.0)
    assert fast_plan is not None and slow_plan is not None
    assert slow_plan.quota_s > fast_plan.quota_s  # more switch time to amortize


def test_a_decode_round_with_many_batches_stays_within_the_cap():
    names = [f"m{i}" for i in range(10)]
    policy = decoding(names, MeasuredCosts(dict.fromkeys(names, 0.1), step_s=0.005))
    # Uncapped, ten batches of 5 ms steps (S = 0.5, c = 1 s) would each get QMAX: a 41 s round.
    _, uncapped = round_quotas([0.005] * 10, round_switch_s=1.0, tbt_s=0.1)
    assert uncapped == pytest.approx([QMAX_S] * 10)
    quotas = one_round(policy, 10)
    assert 1.0 + sum(quotas) == pytest.approx(ROUND_SHARE * SLO.ttft_s)
    assert quotas == pytest.approx([quotas[0]] * 10)  # scaled together
    assert policy.last_alpha <= 1  # … and every batch still gets the tokens its TBT asks for


def test_the_cap_never_shortens_a_round_below_what_keeps_the_token_schedule():
    # Quotas in the formula's ratio (∝ step time); S = 0.3, c = 6 s: below c / (1 − S)
    # ≈ 8.6 s a round would leave every batch behind.
    quotas, alpha = capped_round([2.0, 4.0], [0.01, 0.02], round_switch_s=6.0, tbt_s=0.1,
                                 cap_s=5.0)  # fmt: skip
    assert 6.0 + sum(quotas) == pytest.approx(6.0 / (1 - 0.3))
    assert alpha is not None and alpha == pytest.approx(1.0)


def test_a_saturated_lane_keeps_algorithm_2s_quotas():
    quotas, alpha = capped_round([4.0, 4.0], [0.05, 0.05], round_switch_s=1.0, tbt_s=0.1,
                                 cap_s=5.0)  # fmt: skip
    assert (quotas, alpha) == ([4.0, 4.0], None)  # S = 1: shorter rounds only lose tokens


def test_a_round_within_the_cap_is_left_alone():
    quotas, alpha = capped_round([1.0, 2.0], [0.01, 0.02], round_switch_s=1.0, tbt_s=0.1,
                                 cap_s=5.0)  # fmt: skip
    assert (quotas, alpha) == ([1.0, 2.0], None)


def test_no_quota_outlasts_the_papers_share_of_a_tight_ttft_target():
    """QMAX is 4 s against the paper's 10 s TTFT; under a 0.35 s target a saturated lane's
    quotas stop at 0.4 of it, not at 4 s."""
    tight = Slo(ttft_s=0.35, tbt_s=0.01)
    assert qmax_for(SLO.ttft_s) == QMAX_S and qmax_for(tight.ttft_s) == pytest.approx(0.14)
    policy = AegaeonPolicy({n: ModelSpec(n, 1 << 30, 1024) for n in "AB"}, tight,
                           MeasuredCosts(dict.fromkeys("AB", 0.05), step_s=0.006))  # fmt: skip
    policy.add_instance(InstanceView("i0", role="prefill"))
    policy.add_instance(InstanceView("i1", role="decode"))
    for name in "AB":
        policy.submit(RequestView(f"r-{name}", name, 10, 500, 0.0), now=0.0)
        plan = policy.next_turn("i0", 0.0)
        assert plan is not None
        policy.turn_done("i0", plan, TurnResult(1, 0.1, generated={f"r-{name}": 1}), 0.1)
    # S = 1.2: saturated, so the round keeps Algorithm 2's quotas, capped at QMAX.
    quotas = one_round(policy, 2)
    assert max(quotas) == pytest.approx(0.4 * tight.ttft_s)


def test_a_decode_turn_leaves_a_waiting_group_time_for_its_switch_and_prefill():
    """On a "both" lane earliest deadline first may pick a decode turn while a group waits;
    the turn then ends in time for the group's switch and prefill before its first token is
    due."""
    costs = MeasuredCosts(step_s=0.01)  # switch 1 s, prefill 0.1 s
    policy = AegaeonPolicy({n: ModelSpec(n, 1 << 30, 1024) for n in "AB"}, SLO, costs)
    policy.add_instance(InstanceView("i0", role="both"))
    policy.submit(RequestView("a0", "A", 10, 500, 0.0), now=0.0)
    prefill = policy.next_turn("i0", 0.0)
    assert prefill is not None and prefill.prefill_only
    policy.submit(RequestView("b0", "B", 10, 5, 0.5), now=0.5)  # due at 10.5
    policy.turn_done("i0", prefill, TurnResult(1, 9.0, generated={"a0": 1}), 9.0)
    plan = policy.next_turn("i0", 9.0)  # A's next token is due at 10.1: A decodes first
    assert plan is not None and (plan.model, plan.prefill_only) == ("A", False)
    assert plan.quota_s == pytest.approx(10.5 - 9.0 - 1.0 - 0.1)  # below its own 1.25 s
    policy.turn_done("i0", plan, TurnResult(40, 0.4, generated={"a0": 41}), 9.4)
    nxt = policy.next_turn("i0", 9.4)  # now B's first token is due before A's next
    assert nxt is not None and (nxt.model, nxt.prefill_only) == ("B", True)


def test_a_batch_that_a_cut_would_make_late_keeps_its_quota():
    """Steps as slow as the TBT target bank no time: cut short for B's group, A would miss
    its next token during B's switch, prefill and the switch back, so its turn is not cut."""
    costs = MeasuredCosts(step_s=0.1)
    policy = AegaeonPolicy({n: ModelSpec(n, 1 << 30, 1024) for n in "AB"}, SLO, costs)
    policy.add_instance(InstanceView("i0", role="both"))
    policy.submit(RequestView("a0", "A", 10, 500, 0.0), now=0.0)
    prefill = policy.next_turn("i0", 0.0)
    assert prefill is not None
    policy.submit(RequestView("b0", "B", 10, 5, 0.5), now=0.5)
    policy.turn_done("i0", prefill, TurnResult(1, 9.0, generated={"a0": 1}), 9.0)
    plan = policy.next_turn("i0", 9.0)
    assert plan is not None and (plan.model, plan.prefill_only) == ("A", False)
    assert plan.quota_s == pytest.approx(policy.alone_quota_s)


class WithOverhead(MeasuredCosts):
    """… and a measured control round trip per turn."""

    def __init__(self, overhead_s: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.overhead_s = overhead_s

    def turn_overhead_s(self) -> float:
        return self.overhead_s


def test_quotas_amortize_the_measured_round_trip_of_every_turn():
    """Switches fully hidden (exposed 1 ms): without the turns' round trips the quotas would
    shrink until the round is all round trips; with them counted, each turn runs longer."""
    exposed = {"A": 0.001, "B": 0.001}
    bare = decoding(["A", "B"], MeasuredCosts(exposed))
    paid = decoding(["A", "B"], WithOverhead(0.02, exposed=exposed))
    bare_plan, paid_plan = bare.next_turn("i1", 1.0), paid.next_turn("i1", 1.0)
    assert bare_plan is not None and paid_plan is not None
    _, expected = round_quotas([0.01, 0.01], round_switch_s=0.002 + 2 * 0.02, tbt_s=0.1)
    assert paid_plan.quota_s == pytest.approx(expected[0])
    assert paid_plan.quota_s > 10 * bare_plan.quota_s
