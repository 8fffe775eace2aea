"""Estimators: fitting step-time models from samples, JSON round trip, roofline defaults."""

from __future__ import annotations

import pytest
from aegaeon.scheduler.estimators import (
    TURN_OVERHEAD_PRIOR_S,
    Estimator,
    fit_decode,
    fit_prefill,
    fit_switch,
    load_estimator,
    observe_turn,
)
from aegaeon.scheduler.policies.base import ModelSpec, RequestView, TurnPlan, TurnResult

from aegaeon.sim.hardware import DEVICES, paper_models, roofline_profile


def test_fit_prefill_recovers_the_coefficients_of_clean_samples():
    true = (0.01, 2e-4, 1e-7)
    samples = [(lens, true[0] + true[1] * sum(lens) + true[2] * sum(n * n for n in lens))
               for lens in ([10], [100], [300, 50], [500, 500, 20], [1000])]  # fmt: skip
    assert fit_prefill(samples) == pytest.approx(true, rel=1e-6)


def test_fit_decode_recovers_the_coefficients_of_clean_samples():
    true = (0.02, 1e-6, 3e-4)
    samples = [(lens, true[0] + true[1] * sum(lens) + true[2] * len(lens))
               for lens in ([10], [100, 100], [300, 50, 7], [500] * 8, [1000] * 3)]  # fmt: skip
    assert fit_decode(samples) == pytest.approx(true, rel=1e-6)


def test_fits_never_return_negative_costs():
    samples = [([10], 0.05), ([100], 0.04), ([1000], 0.03)]  # noisy, falling with size
    assert all(c >= 0 for c in fit_prefill(samples))


def test_fit_switch_finds_bandwidth_and_fixed_cost():
    fixed, bandwidth = fit_switch([(b, 0.05 + b / 5e9) for b in (1e8, 1e9, 4e9)])
    assert fixed == pytest.approx(0.05)
    assert bandwidth == pytest.approx(5e9)


def test_estimator_survives_a_json_round_trip(tmp_path):
    models = paper_models(3)
    est = load_estimator(None, models, device="H800")
    path = tmp_path / "profile.json"
    est.save(path)
    again = load_estimator(str(path), models)
    name = next(iter(models))
    assert again.device == "H800"
    assert again.decode_time(name, [100, 200]) == est.decode_time(name, [100, 200])
    assert again.switch_time(name) == est.switch_time(name)


def test_models_missing_from_a_profile_get_roofline_defaults(tmp_path):
    models = {"a": ModelSpec("a", 1 << 30, 1024), "b": ModelSpec("b", 2 << 30, 2048)}
    only_a = Estimator({"a": roofline_profile(models["a"], "cpu")}, "cpu")
    path = tmp_path / "p.json"
    only_a.save(path)
    est = load_estimator(str(path), models)
    assert est.switch_time("b") > est.switch_time("a")


def test_a_removed_model_leaves_nothing_learned_behind_but_a_measured_profile(tmp_path):
    models = {"a": ModelSpec("a", 1 << 30, 1024), "b": ModelSpec("b", 2 << 30, 2048)}
    path = tmp_path / "p.json"
    Estimator({"a": roofline_profile(models["a"], "cpu")}, "cpu").save(path)
    est = load_estimator(str(path), models)
    for name in models:
        est.observe_steps(name, decode=([100], est.decode_time(name, [100]) / 2))
        est.observe_switch(name, 0.1, copied_bytes=10, prefetched_bytes=0)
    est.remove_model("a")
    est.remove_model("b")
    assert est.scales == {} and est.exposed_s == {}
    assert set(est.profiles) == {"a"}  # measured by `aegaeon profile`: kept for a return
    est.add_model(models["b"])  # registered again: a fresh roofline default
    assert est.switch_time("b") > est.switch_time("a")


def test_roofline_decode_is_bound_by_reading_the_weights():
    seven_b = paper_models(1)["m000-7b"]
    h800 = roofline_profile(seven_b, DEVICES["H800"])
    a100 = roofline_profile(seven_b, DEVICES["A100"])
    # 13.5 GB at 80% of 3.35 TB/s ≈ 5 ms, plus the per-step overhead.
    assert 0.007 < h800.decode[0] < 0.011
    assert a100.decode[0] > h800.decode[0]  # less HBM bandwidth


def test_roofline_prefill_is_bound_by_flops():
    seven_b = paper_models(1)["m000-7b"]
    h20 = Estimator({"m": roofline_profile(seven_b, DEVICES["H20"])})
    h800 = Estimator({"m": roofline_profile(seven_b, DEVICES["H800"])})
    # The H20 has more bandwidth but far fewer FLOPs: slower prefill, faster decode.
    assert h20.prefill_time("m", [2000]) > 3 * h800.prefill_time("m", [2000])
    assert h20.decode_time("m", [2000]) < h800.decode_time("m", [2000])


def test_exposed_switch_time_is_unknown_until_a_switch_is_observed():
    est = load_estimator(None, {"a": ModelSpec("a", 1 << 30, 1024)})
    assert est.exposed_switch_time("a") is None
    est.observe_switch("a", 0.2, copied_bytes=100, prefetched_bytes=900)
    assert est.exposed_switch_time("a") == pytest.approx(0.2)


def test_exposed_switch_time_follows_recent_switches():
    est = load_estimator(None, {"a": ModelSpec("a", 1 << 30, 1024)})
    est.observe_switch("a", 1.0, copied_bytes=1000, prefetched_bytes=0)
    for _ in range(30):
        est.observe_switch("a", 0.1, copied_bytes=0, prefetched_bytes=1000)
    assert est.exposed_switch_time("a") == pytest.approx(0.1, abs=0.01)


def test_prefetch_hidden_fraction_counts_bytes_copied_in_the_background():
    est = load_estimator(None, {"a": ModelSpec("a", 1 << 30, 1024)})
    assert est.prefetch_hidden_fraction() is None
    est.observe_switch("a", 0.3, copied_bytes=200, prefetched_bytes=800)
    assert est.prefetch_hidden_fraction() == pytest.approx(0.8)


# ---------------------------------------------------------------- learning online


def roofline_a() -> Estimator:
    return load_estimator(None, {"a": ModelSpec("a", 1 << 26, 1 << 12)})


def test_decode_and_prefill_predictions_converge_to_what_workers_measure():
    """A roofline default three times too slow: after a few turns it predicts the device."""
    est = roofline_a()
    predicted_decode, predicted_prefill = (
        est.decode_time("a", [100, 200]),
        est.prefill_time("a", [64]),
    )
    for _ in range(30):
        est.observe_steps("a", decode=([100, 200], predicted_decode / 3))
        est.observe_steps("a", prefill=([64], predicted_prefill / 2))
    assert est.decode_time("a", [100, 200]) == pytest.approx(predicted_decode / 3, rel=0.01)
    assert est.prefill_time("a", [64]) == pytest.approx(predicted_prefill / 2, rel=0.01)
    assert est.decode_time("a", [1000] * 4) < roofline_a().decode_time("a", [1000] * 4)


def test_a_whole_copy_teaches_the_switch_time_and_a_prefetched_one_does_not():
    est = roofline_a()
    full = est.switch_time("a")
    est.observe_switch("a", 0.01 * full, copied_bytes=1000, prefetched_bytes=900)  # partly hidden
    assert est.switch_time("a") == pytest.approx(full)
    est.observe_switch("a", full / 20, copied_bytes=1000, prefetched_bytes=0)
    assert est.switch_time("a") == pytest.approx(full / 20)


def test_one_wild_sample_moves_a_scale_a_bounded_step():
    est = roofline_a()
    decode = est.decode_time("a", [100])
    for _ in range(10):
        est.observe_steps("a", decode=([100], decode))
    est.observe_steps("a", decode=([100], decode * 1e6))  # a stall
    assert est.decode_time("a", [100]) < decode * 11


def test_a_turn_teaches_its_prefill_over_the_prompts_and_its_decode_over_the_contexts():
    est = roofline_a()
    requests = {
        "r1": RequestView("r1", "a", 100, 50, 0.0),
        "r2": RequestView("r2", "a", 40, 50, 0.0),
    }
    prefill = TurnPlan("i", "a", ["r1", "r2"], 0.0, prefill_only=True)
    observe_turn(
        est,
        prefill,
        requests,
        TurnResult(1, 0.1, prefill_s=est.prefill_time("a", [100, 40]) * 2),
        0.001,
    )
    assert est.prefill_time("a", [100, 40]) == pytest.approx(
        2 * roofline_a().prefill_time("a", [100, 40])
    )
    for r in requests.values():
        r.prefilled, r.generated = True, 1
    decode = TurnPlan("i", "a", ["r1", "r2"], 1.0)
    step = roofline_a().decode_time("a", [101 + 5, 41 + 5]) / 4  # at the turn's middle
    observe_turn(
        est, decode, requests, TurnResult(11, 0.5, decode_steps=10, decode_s=10 * step), 0.001
    )
    assert est.decode_time("a", [106, 46]) == pytest.approx(step)


def test_the_turn_round_trip_is_learned_as_it_is_measured():
    est = roofline_a()
    assert est.turn_overhead_s() == TURN_OVERHEAD_PRIOR_S  # nothing measured yet
    est.observe_turn_overhead(0.7)  # a cold start's first turn: bounded
    assert est.turn_overhead_s() < 3 * TURN_OVERHEAD_PRIOR_S
    for _ in range(40):
        est.observe_turn_overhead(0.004)
    assert est.turn_overhead_s() == pytest.approx(0.004, rel=0.01)
