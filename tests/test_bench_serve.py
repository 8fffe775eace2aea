"""``aegaeon bench serve``: the pure parts (trace scaling, records from client timestamps, goodput
and its ratios, run-to-run spread, prefetch share, simulator agreement, device budget, the JSON
written) and one short real replay against the stack."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from aegaeon.scheduler.policies import POLICIES
from aegaeon.scheduler.policies.base import Slo
from bench_serve_args import serve_args

from aegaeon.bench import serve
from aegaeon.bench.client import StreamTiming
from aegaeon.bench.serve_models import bench_specs, budget_fraction, device_budget
from aegaeon.bench.serve_replay import error_kind
from aegaeon.bench.serve_report import (
    goodput_ratio,
    policy_goodput,
    prefetch_background_fraction,
    prefetch_hidden_fraction,
    ratio_spread,
    sim_differences,
)
from aegaeon.bench.serve_run import BenchPlan
from aegaeon.bench.serve_sweep import switch_summary
from aegaeon.bench.serve_trace import CpuScale, clamp_lengths, prompt_ids, scaled_slo, to_record
from aegaeon.protocol import SwitchDone
from aegaeon.workload import TraceRequest, generate_trace

MiB = 1 << 20


def _req(rid: str = "r1", prompt: int = 100, output: int = 20) -> TraceRequest:
    return TraceRequest(rid, "m", 1.0, prompt, output)


def test_cpu_scale_shrinks_sharegpt_lengths_by_its_factor() -> None:
    dist = CpuScale(factor=0.1).lengths()
    assert dist.input_median == pytest.approx(54.0)
    assert dist.output_mean == pytest.approx(29.0)


def test_clamp_lengths_keeps_every_request_within_the_cpu_range() -> None:
    scale = CpuScale()
    trace = generate_trace(["a", "b"], 2.0, 20.0, lengths=scale.lengths(), seed=3)
    clamped = clamp_lengths(
        [*trace, _req(prompt=1, output=1), _req(prompt=9999, output=999)], scale
    )
    assert all(scale.min_input <= r.prompt_len <= scale.max_input for r in clamped)
    assert all(scale.min_output <= r.output_len <= scale.max_output for r in clamped)
    assert [r.arrival for r in clamped[: len(trace)]] == [r.arrival for r in trace]


def test_prompt_ids_are_deterministic_of_the_traced_length_and_avoid_special_tokens() -> None:
    first, again = prompt_ids(_req(prompt=77), 2048), prompt_ids(_req(prompt=77), 2048)
    other = prompt_ids(_req("r2", prompt=77), 2048)
    assert first == again and len(first) == 77 and first != other
    assert all(16 <= t < 2048 for t in first)


def test_to_record_puts_client_timestamps_on_the_trace_clock() -> None:
    record = to_record(_req(), sent_at=101.5, token_times=[102.0, 102.25], ok=True, origin=100.0)
    assert record.arrival == pytest.approx(1.5)
    assert list(record.token_times) == pytest.approx([2.0, 2.25])
    assert record.finished and record.output_len == 20


def test_scaled_slo_multiplies_each_isolated_latency_by_its_own_scale() -> None:
    slo = scaled_slo(0.1, 0.05, tbt_scale=5, ttft_scale=20)
    assert (slo.ttft_s, slo.tbt_s) == pytest.approx((2.0, 0.25))


def test_the_default_ttft_slo_keeps_the_papers_proportion_for_scaled_outputs() -> None:
    """The paper: TTFT 10 s = 100 TBT SLOs for its outputs; outputs ×0.3 → 30 TBT SLOs."""
    slo = scaled_slo(0.1, 0.002, tbt_scale=5, length_factor=0.3)
    assert (slo.ttft_s, slo.tbt_s) == pytest.approx((0.3, 0.01))
    assert scaled_slo(0.1, 0.002, tbt_scale=5, length_factor=1.0).ttft_s == pytest.approx(1.0)


def _points(*pairs: tuple[float, float]) -> list[dict]:
    return [{"rate_per_model": r, "attainment": a} for r, a in pairs]


def test_goodput_is_the_highest_rate_at_and_below_which_every_rate_passes() -> None:
    assert policy_goodput(_points((0.1, 1.0), (0.2, 0.9), (0.4, 0.5))) == 0.2
    # A pass above a miss does not count: the miss at 0.2 settles goodput at 0.1.
    assert policy_goodput(_points((0.1, 0.95), (0.2, 0.8), (0.4, 0.92))) == 0.1
    assert policy_goodput(_points((0.4, 0.92), (0.1, 0.95), (0.2, 0.8))) == 0.1  # any order
    assert policy_goodput(_points((0.1, 0.89), (0.2, 1.0))) == 0.0
    assert policy_goodput([]) == 0.0


def test_goodput_ratio_divides_and_gives_a_lower_bound_when_the_baseline_never_passes() -> None:
    assert goodput_ratio(0.4, 0.1, 0.05) == (pytest.approx(4.0), None)
    assert goodput_ratio(0.4, 0.0, 0.05) == (None, pytest.approx(8.0))
    assert goodput_ratio(0.0, 0.0, 0.05) == (None, None)
    assert goodput_ratio(0.6, 0.4, 0.1) == (1.5, None)  # exactly: 0.6 / 0.4 < 1.5 in floats
    assert goodput_ratio(0.6, 0.0, 0.1)[1] == 6.0


def test_ratio_spread_is_the_largest_relative_difference_between_runs() -> None:
    runs = [
        {"goodput_ratio_vs_request_level": 2.0, "goodput_ratio_vs_static_mux": 1.5},
        {"goodput_ratio_vs_request_level": 2.4, "goodput_ratio_vs_static_mux": 1.5},
    ]
    keys = ["goodput_ratio_vs_request_level", "goodput_ratio_vs_static_mux", "goodput_ratio_vs_x"]
    spread, by_key = ratio_spread(runs, keys)
    assert spread == pytest.approx(0.2)
    assert by_key == {"goodput_ratio_vs_request_level": pytest.approx(0.2),
                      "goodput_ratio_vs_static_mux": 0.0}  # fmt: skip
    # A ratio that one run could not give (its baseline passed nowhere) has no finite spread.
    runs[1]["goodput_ratio_vs_static_mux"] = None
    spread, by_key = ratio_spread(runs, keys)
    assert spread is None and by_key["goodput_ratio_vs_static_mux"] is None
    # Rounded as the ratios are: (4/3 − 1) / 1 is 0.333333, not 0.3333330000000001.
    thirds = [{"goodput_ratio_vs_request_level": 1.0}, {"goodput_ratio_vs_request_level": 1.333333}]
    assert ratio_spread(thirds, keys)[0] == 0.333333


def test_prefetch_hidden_fraction_is_the_share_of_switch_bytes_copied_behind_a_turn() -> None:
    events = [SwitchDone("w", "a", "b", 0.001, 10, prefetched_bytes=90),
              SwitchDone("w", "b", "c", 0.01, 100, prefetched_bytes=0),
              SwitchDone("w", "c", "a", 0.0, 0, prefetched_bytes=0)]  # fmt: skip
    summary = switch_summary(events)
    # One found its model partly copied, one not at all; the third had it resident (no copy).
    assert summary == {"count": 3, "bytes": 110, "prefetched_bytes": 90, "prefetched_idle_bytes": 0,
                       "wait_s": pytest.approx(0.011), "whole": 0, "partial": 1, "none": 1}  # fmt: skip
    whole = switch_summary([SwitchDone("w", "a", "b", 0.0, 0, prefetched_bytes=90)])
    assert (whole["whole"], whole["partial"], whole["none"]) == (1, 0, 0)
    assert prefetch_hidden_fraction([summary]) == pytest.approx(90 / 200)
    assert prefetch_background_fraction([summary]) == pytest.approx(90 / 200)
    assert prefetch_hidden_fraction([switch_summary([])]) is None
    # A model staged on an idle worker is background but hid nothing behind a decode.
    idle = switch_summary([*events, SwitchDone("w", "a", "d", 0.0, 0, 100, staged_while_idle=True)])
    assert idle["prefetched_idle_bytes"] == 100
    assert prefetch_hidden_fraction([idle]) == pytest.approx(90 / 300)
    assert prefetch_background_fraction([idle]) == pytest.approx(190 / 300)


def test_sim_differences_report_the_worst_rate_in_points() -> None:
    policies = {
        "aegaeon": {"points": [{"attainment": 0.9, "sim": {"attainment": 0.85}},
                               {"attainment": 0.5, "sim": {"attainment": 0.7}}]},
        "dedicated": {"points": [{"attainment": 0.2}]},
    }  # fmt: skip
    assert sim_differences(policies) == {"aegaeon": pytest.approx(20.0)}
    # Exactly 10 points, not 10.000000000000009 (0.8 − 0.7 in floats), against a ≤ 10 goal.
    tenth = {"aegaeon": {"points": [{"attainment": 0.7, "sim": {"attainment": 0.8}}]}}
    assert sim_differences(tenth) == {"aegaeon": 10.0}


def test_device_budget_fits_the_largest_model_per_slot_and_half_the_bench_weights() -> None:
    sizes = [15 * MiB, 14 * MiB, 14 * MiB, 15 * MiB, 13 * MiB]
    arena, weights = device_budget(sizes)
    assert weights // 2 >= max(sizes) and arena == 2 * weights
    assert budget_fraction(weights, sizes) <= 0.5
    assert len({s.name for s in bench_specs(7)}) == 7


def test_error_kind_buckets_refusals_breaks_and_abandoned_requests() -> None:
    assert error_kind(StreamTiming([1.0], True)) is None
    assert error_kind(StreamTiming([], False, "HTTP 503: no", 0.0, 503)) == "HTTP 503"
    assert error_kind(None) == "abandoned at drain"


# ---------------------------------------------------------------- the plan and the JSON


def test_quick_compares_every_registered_baseline_and_leaves_dedicated_out() -> None:
    quick = serve.default_policies(quick=True).split(",")
    assert quick[:2] == ["aegaeon", "request-level"] and "static-mux" in quick
    assert "dedicated" not in quick
    assert ("sllm-plus" in quick) == ("sllm-plus" in POLICIES)
    assert "dedicated" in serve.default_policies(quick=False).split(",")


def test_every_rate_gets_the_same_trace_with_at_least_the_minimum_requests(
    bench_models: Path, tmp_path: Path
) -> None:
    args = serve_args("--models-dir", str(bench_models), "--models", "2", "--rates", "0.5,0.05",
                      "--duration", "4", "--min-requests", "20")  # fmt: skip
    plan = BenchPlan.build(args, tmp_path)
    again = BenchPlan.build(args, tmp_path)
    assert plan.rates == [0.05, 0.5]
    assert [len(plan.traces[r]) for r in plan.rates] == [20, 20]  # the low rate: exactly 20
    assert plan.min_requests_per_point == 20
    assert plan.traces == again.traces  # every policy and every repeat replays the same trace


def test_every_policy_stack_is_started_with_the_one_calibrated_slo(
    bench_models: Path, tmp_path: Path
) -> None:
    plan = BenchPlan.build(serve_args("--models-dir", str(bench_models), "--models", "2"), tmp_path)
    assert "--slo-ttft" not in plan.stack_args()  # not calibrated yet
    plan.slo = Slo(0.375, 0.0126)
    extra = plan.stack_args()
    assert extra[extra.index("--slo-ttft") + 1] == "0.375"
    assert extra[extra.index("--slo-tbt") + 1] == "0.0126"


def _point(rate: float, attained: float, sim: float | None = None, switches: dict | None = None) -> dict:  # fmt: skip
    point = {"rate_per_model": rate, "attainment": attained, "time_fraction_attainment": attained,
             "requests": 20, "finished": 20}  # fmt: skip
    if sim is not None:
        point["sim"] = {"attainment": sim}
    if switches is not None:
        point["switches"] = switches
    return point


def test_the_json_carries_every_headline_figure_and_repeats_report_their_spread(
    bench_models: Path, tmp_path: Path
) -> None:
    plan = BenchPlan.build(serve_args("--models-dir", str(bench_models), "--models", "2",
                                      "--rates", "0.1,0.2,0.4"), tmp_path)  # fmt: skip
    plan.slo = Slo(0.4, 0.013)

    def policies(static_mux_at_02: float) -> dict:
        moved = {"count": 4, "bytes": 20, "prefetched_bytes": 80, "wait_s": 0.01}
        return {
            "aegaeon": {"points": [_point(0.1, 1.0, 0.97, moved), _point(0.2, 0.95, 0.9, moved),
                                   _point(0.4, 0.91, 0.85, moved)]},
            "request-level": {"points": [_point(0.1, 0.95, 0.9), _point(0.2, 0.5, 0.55)]},
            "static-mux": {"points": [_point(0.1, 0.95), _point(0.2, static_mux_at_02),
                                      _point(0.4, 0.2)]},
        }  # fmt: skip

    first = serve.assemble(plan, policies(0.93))
    assert first["goodput_ratio_vs_request_level"] == pytest.approx(4.0)
    assert first["goodput_ratio_vs_static_mux"] == pytest.approx(2.0)
    assert first["prefetch_hidden_fraction"] == pytest.approx(0.8)
    assert first["prefetch_background_fraction"] == pytest.approx(0.8)
    assert first["sim_vs_measured_max_abs_diff"] == pytest.approx(6.0)
    assert first["min_requests_per_point"] == 20
    assert first["device"]["weight_budget_within_half"] is (
        first["device"]["budget_fraction_of_weights"] <= 0.5
    )
    assert first["slo"]["passed_to_every_policy"] is True
    second = serve.assemble(plan, policies(0.5))  # static-mux now misses at 0.2
    both = serve.combine([first, second])
    assert both["goodput_ratio_vs_static_mux_runs"] == [pytest.approx(2.0), pytest.approx(4.0)]
    assert both["goodput_ratio_vs_static_mux"] == pytest.approx(2.0)  # the pessimistic run
    assert both["goodput_ratio_spread"] == pytest.approx(1.0)
    assert len(both["runs"]) == 2
    assert "goodput_ratio_vs_sllm_plus" not in both  # a baseline no run compared against
    json.loads(json.dumps(both))  # plain JSON


# ---------------------------------------------------------------- one real replay


def test_replay_against_a_running_gateway_writes_every_metric(
    bench_models: Path, tmp_path: Path
) -> None:
    from aegaeon.bench.stack_process import StackProcess

    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    out = tmp_path / "serve.json"
    with StackProcess(tmp_path / "home", models_dir=bench_models, policy="aegaeon") as stack:
        args = parser.parse_args([
            "--url", stack.url, "--nats-url", stack.nats_url, "--models-dir", str(bench_models),
            "--policies", "aegaeon", "--models", "2", "--rates", "1.0", "--duration", "4",
            "--min-requests", "6", "--drain", "30",
            "--json", str(out), "--plot", str(tmp_path / "serve.png"),
        ])  # fmt: skip
        assert serve.main(args) == 0
    result = json.loads(out.read_text())
    point = result["policies"]["aegaeon"]["points"][0]
    assert point["requests"] > 0 and point["finished"] == point["requests"]
    for key in ("attainment", "time_fraction_attainment", "ttft_s", "tbt_s", "tpot_s", "e2e_s"):
        assert key in point
    assert point["ttft_s"]["p50"] > 0 and "attainment" in point["sim"]
    assert result["slo"]["tbt_s"] == pytest.approx(5 * result["isolated"]["tbt_s"])
    assert result["slo"]["ttft_s"] == pytest.approx(30 * result["slo"]["tbt_s"])
    assert "sim_vs_measured_max_abs_diff" in result
    assert result["min_requests_per_point"] == point["requests"] >= 6
    # The workers' switches were watched on NATS during the point (2 models: at least one).
    assert point["switches"]["count"] >= 1 and "prefetch_hidden_fraction" in result
    assert (tmp_path / "serve.png").stat().st_size > 0


def test_the_simulators_decode_step_is_priced_as_the_live_workers_ran_it() -> None:
    from aegaeon.scheduler.estimators import Estimator, ModelProfile

    from aegaeon.bench.serve_sim import live_step_overhead
    from aegaeon.protocol import TurnDone

    # 10 ms a step alone + 1 ms per sequence in the batch, whatever the context.
    profile = ModelProfile(prefill=(0.05, 0.0, 0.0), decode=(0.010, 0.001, 0.0),
                           switch_fixed_s=0.0, link_bytes_per_s=1e9, weight_bytes=1,
                           kv_bytes_per_token=1)  # fmt: skip
    cost = Estimator({"m": profile})
    trace = [TraceRequest("r", "m", 0.0, 40, 20)]
    alone = cost.decode_time("m", [50]), cost.decode_time("m", [50, 50])
    turns = [
        TurnDone("w", 1, "m", steps=5, elapsed_s=1.0, decode_s=4 * (alone[0] + 0.004), batch_size=1),
        TurnDone("w", 2, "m", steps=3, elapsed_s=1.0, decode_s=2 * (alone[1] + 0.010), batch_size=2),
        TurnDone("w", 3, "m", steps=1, elapsed_s=1.0, prefill_s=0.2, batch_size=1),  # no decode
        TurnDone("w", 4, "other", steps=9, elapsed_s=1.0, decode_s=8.0, batch_size=1),  # unknown
    ]  # fmt: skip
    extra, steps = live_step_overhead(turns, cost, trace) or (None, None)
    assert steps == 6
    assert extra == pytest.approx((4 * 0.004 + 2 * 0.010) / 6)
    assert live_step_overhead(turns[2:3], cost, trace) is None


def test_the_simulators_turn_control_cost_is_the_live_gap_between_turns_while_work_waited() -> None:
    from aegaeon.bench.serve_sim import live_control_overhead, point_control_s
    from aegaeon.protocol import TurnDone
    from aegaeon.sim.instance import CONTROL_OVERHEAD_S

    def turn(worker: str, elapsed: float, prefilled: list[str] | None = None) -> TurnDone:
        return TurnDone(worker, 0, "m", steps=3, elapsed_s=elapsed, prefilled=prefilled or [])

    # (turn, when its TurnDone reached the benchmark): worker w's turns started 4 ms and 6 ms
    # after the TurnDone before them; its prefill turn started 0.5 s after one (an arrival:
    # idle, not control); worker v's first turn has no turn before it on v.
    seen = [
        (turn("w", 0.10), 1.000),
        (turn("v", 0.20), 1.050),
        (turn("w", 0.20), 1.204),  # started 1.004
        (turn("w", 0.10, ["new"]), 1.804),  # started 1.704: not counted
        (turn("w", 0.30), 2.110),  # started 1.810: 6 ms after 1.804
    ]
    turns, received = [t for t, _ in seen], [at for _, at in seen]
    seconds, count = live_control_overhead(turns, received) or (None, None)
    assert count == 2 and seconds == pytest.approx(0.005)
    assert live_control_overhead(turns[:2], received[:2]) is None
    point = {"turns": turns, "turns_received_s": received}
    assert point_control_s(point) == pytest.approx(0.005)
    assert point["sim_control_overhead"] == {"seconds": pytest.approx(0.005), "turns": 2}
    assert point_control_s({}) == CONTROL_OVERHEAD_S
