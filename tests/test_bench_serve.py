"""``aegaeon bench serve``: the pure parts (trace scaling, records from client timestamps, goodput
ratios, simulator agreement, device budget) and one short real replay against the stack."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from aegaeon.bench import serve
from aegaeon.bench.serve_models import bench_specs, budget_fraction, device_budget
from aegaeon.bench.serve_replay import error_kind
from aegaeon.bench.serve_report import goodput_ratio, policy_goodput, sim_differences
from aegaeon.bench.serve_trace import (
    CpuScale,
    clamp_lengths,
    prompt_ids,
    realized_trace,
    scaled_slo,
    to_record,
)
from aegaeon.bench.stack import StreamTiming
from aegaeon.slo_metrics import RequestRecord
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


def test_realized_trace_takes_the_produced_length_of_finished_requests_only() -> None:
    trace = [_req("a", output=20), _req("b", output=20)]
    records = [
        RequestRecord("a", "m", 1.0, 20, [2.0, 2.1, 2.2], finished=True),
        RequestRecord("b", "m", 1.0, 20, [2.0], finished=False),
    ]
    assert [r.output_len for r in realized_trace(trace, records)] == [3, 20]


def test_scaled_slo_multiplies_each_isolated_latency_by_its_own_scale() -> None:
    slo = scaled_slo(0.1, 0.05, tbt_scale=5, ttft_scale=20)
    assert (slo.ttft_s, slo.tbt_s) == pytest.approx((2.0, 0.25))


def test_goodput_is_the_highest_rate_reaching_ninety_percent() -> None:
    points = [{"rate_per_model": r, "attainment": a} for r, a in ((0.1, 1.0), (0.2, 0.9), (0.4, 0.5))]  # fmt: skip
    assert policy_goodput(points) == 0.2


def test_goodput_ratio_divides_and_gives_a_lower_bound_when_the_baseline_never_passes() -> None:
    assert goodput_ratio(0.4, 0.1, 0.05) == (pytest.approx(4.0), None)
    assert goodput_ratio(0.4, 0.0, 0.05) == (None, pytest.approx(8.0))
    assert goodput_ratio(0.0, 0.0, 0.05) == (None, None)


def test_sim_differences_report_the_worst_rate_in_points() -> None:
    policies = {
        "aegaeon": {"points": [{"attainment": 0.9, "sim": {"attainment": 0.85}},
                               {"attainment": 0.5, "sim": {"attainment": 0.7}}]},
        "dedicated": {"points": [{"attainment": 0.2}]},
    }  # fmt: skip
    assert sim_differences(policies) == {"aegaeon": pytest.approx(20.0)}


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


# ---------------------------------------------------------------- one real replay


@pytest.fixture(scope="module")
def bench_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from aegaeon.bench.serve_models import write_bench_models

    out = tmp_path_factory.mktemp("bench-models")
    write_bench_models(out, 2)
    return out


def test_replay_against_a_running_gateway_writes_every_metric(
    bench_models: Path, tmp_path: Path
) -> None:
    from aegaeon.bench.stack_process import StackProcess

    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    out = tmp_path / "serve.json"
    with StackProcess(tmp_path / "home", models_dir=bench_models, policy="aegaeon") as stack:
        args = parser.parse_args([
            "--url", stack.url, "--models-dir", str(bench_models), "--policies", "aegaeon",
            "--models", "2", "--rates", "0.4", "--duration", "5", "--drain", "30",
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
    assert "sim_vs_measured_max_abs_diff" in result
    assert (tmp_path / "serve.png").stat().st_size > 0
