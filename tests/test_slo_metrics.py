"""SLO metrics: deadline-schedule attainment, the time-fraction score, percentiles, goodput."""

from __future__ import annotations

import pytest
from aegaeon.scheduler.policies.base import Slo

from aegaeon.slo_metrics import (
    RequestRecord,
    artifact_qos_score,
    goodput,
    latencies,
    meets_slo,
    summarize,
    time_fraction_score,
)

SLO = Slo(ttft_s=1.0, tbt_s=0.1)


def record(times, finished=True, arrival=0.0):
    return RequestRecord("r", "m", arrival, len(times), list(times), finished)


def test_tokens_on_their_deadline_schedule_meet_the_slo():
    # token k is due by arrival + TTFT + (k-1)·TBT: 1.0, 1.1, 1.2
    assert meets_slo(record([0.5, 1.1, 1.2]), SLO)


def test_one_late_token_fails_the_request_even_after_early_ones():
    assert not meets_slo(record([0.1, 0.2, 1.25]), SLO)


def test_a_burst_after_an_early_first_token_is_allowed_by_the_schedule():
    # The first token came 0.9 s early, so the next may come late against TBT yet be on time.
    assert meets_slo(record([0.1, 1.05, 1.06]), SLO)


def test_an_unfinished_request_never_meets_the_slo_and_scores_zero():
    rec = record([0.1, 0.2], finished=False)
    assert not meets_slo(rec, SLO)
    assert time_fraction_score(rec, SLO) == 0.0


def test_time_fraction_counts_the_time_spent_behind_schedule():
    # TTFT late by 1 s (token 1 at 2.0, due 1.0); token 2 at 2.05 is due 1.1: late over
    # [1.0, 2.05]; span = 2.05 s → score = 1 − 1.05/2.05
    score = time_fraction_score(record([2.0, 2.05]), SLO)
    assert score == pytest.approx(1 - 1.05 / 2.05)


def test_latencies_follow_vllm_definitions():
    ttft, tpot, e2e, gaps = latencies(record([0.5, 0.7, 1.1], arrival=0.0))
    assert (ttft, e2e) == (0.5, 1.1)
    assert tpot == pytest.approx(0.3)
    assert gaps == pytest.approx([0.2, 0.4])


def test_artifact_qos_reproduces_the_artifacts_own_worked_example():
    # plot_e2e.py compute_slo: arrival 0, tokens (3, 6, 7, 8), SLO (3, 2) → QoS 5/8.
    # token 3: on time, credit 3, target 5; token 6: late (6 > 5), bank 3, segment starts at 6,
    # target 7; token 7: 1 ≤ 7, credit 7, target 9; token 8: 2 ≤ 9, target 11;
    # end: 3 + min(11, 8 − 6) = 5 over a span of 8.
    assert artifact_qos_score(record([3.0, 6.0, 7.0, 8.0]), Slo(3.0, 2.0)) == 5 / 8


def test_artifact_qos_banks_the_cumulative_target_not_the_time_on_schedule():
    # tokens (1, 2, 30), SLO (3, 2): credit 3 then 5 (target 7); token 30 is late: bank 5,
    # new segment at 30, target 9; end adds min(9, 0) = 0 → 5/30.
    rec = record([1.0, 2.0, 30.0])
    assert artifact_qos_score(rec, Slo(3.0, 2.0)) == pytest.approx(5 / 30)
    # Our time-fraction view differs: late from token 3's deadline 7 to 30 → 1 − 23/30.
    assert time_fraction_score(rec, Slo(3.0, 2.0)) == pytest.approx(7 / 30)


def test_artifact_qos_is_one_when_every_token_is_on_time():
    # target 2 → 4 → 6 → 8 with tokens at 1, 3, 5: end adds min(8, 5) = 5 over 5.
    assert artifact_qos_score(record([1.0, 3.0, 5.0]), Slo(2.0, 2.0)) == 1.0


def test_artifact_qos_of_an_unfinished_request_is_zero():
    assert artifact_qos_score(record([0.1, 0.2], finished=False), SLO) == 0.0


def test_summary_reports_the_three_attainment_views():
    recs = [record([0.5, 0.6]), record([3.0, 3.1])]
    out = summarize(recs, SLO)
    assert out["attainment"] == 0.5
    assert 0.5 < out["time_fraction_attainment"] < 1.0
    # second request: token 3.0 late (bank 0, start 3.0, target 1.1), token 3.1 on time
    # (credit 1.1, target 1.2); end 0 + min(1.2, 0.1) = 0.1 over 3.1 → mean (1 + 0.1/3.1)/2
    assert out["artifact_qos"] == pytest.approx((1 + 0.1 / 3.1) / 2)
    assert out["ttft_s"]["p50"] == pytest.approx(1.75)


def test_goodput_is_the_highest_rate_with_ninety_percent_attainment():
    assert goodput([(0.5, 1.0), (1.0, 0.95), (2.0, 0.89)]) == 1.0
    assert goodput([(1.0, 0.5)]) == 0.0
    assert goodput([(0.5, 0.95), (1.0, 0.8), (2.0, 0.92)]) == 0.5  # a pass above a miss is luck
