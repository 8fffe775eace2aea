"""Estimators: fitting step-time models from samples, JSON round trip, roofline defaults."""

from __future__ import annotations

import pytest
from aegaeon.scheduler.estimators import (
    Estimator,
    fit_decode,
    fit_prefill,
    fit_switch,
    load_estimator,
)
from aegaeon.scheduler.policies.base import ModelSpec

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
