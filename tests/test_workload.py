"""Trace generation: arrival processes, popularity, ShareGPT-like lengths, a real ShareGPT file."""

from __future__ import annotations

import json

import numpy as np
import pytest

from aegaeon.workload import (
    SHAREGPT,
    arrival_times,
    generate_trace,
    load_sharegpt,
    lognormal_params,
    model_rates,
    sample_lengths,
    trace_from_json,
    trace_to_json,
)


def test_lognormal_params_reproduce_mean_and_median():
    mu, sigma = lognormal_params(700, 540)
    assert np.exp(mu) == pytest.approx(540)
    assert np.exp(mu + sigma**2 / 2) == pytest.approx(700)


def test_sampled_lengths_match_sharegpt_statistics():
    prompts, outputs = sample_lengths(SHAREGPT, 200_000, np.random.default_rng(0))
    assert np.median(prompts) == pytest.approx(540, rel=0.03)
    assert np.median(outputs) == pytest.approx(260, rel=0.03)
    assert prompts.mean() == pytest.approx(700, rel=0.05)  # clipping trims the tail a little
    assert outputs.mean() == pytest.approx(290, rel=0.05)
    assert prompts.max() <= SHAREGPT.max_input and prompts.min() >= 1


def test_poisson_arrivals_have_the_asked_rate_and_unit_cv():
    times = arrival_times(2.0, 5000, np.random.default_rng(1))
    gaps = np.diff(times)
    assert len(times) / 5000 == pytest.approx(2.0, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)


def test_gamma_arrivals_are_bursty_with_the_asked_cv():
    times = arrival_times(2.0, 5000, np.random.default_rng(2), kind="gamma", cv=3.0)
    gaps = np.diff(times)
    assert len(times) / 5000 == pytest.approx(2.0, rel=0.1)
    assert gaps.std() / gaps.mean() == pytest.approx(3.0, rel=0.15)


def test_zipf_popularity_favours_the_first_models_and_keeps_the_total():
    rates = model_rates(10.0, 5, "zipf", zipf_s=1.0)
    assert rates.sum() == pytest.approx(10.0)
    assert list(rates) == sorted(rates, reverse=True)
    assert rates[0] / rates[1] == pytest.approx(2.0)


def test_trace_is_sorted_deterministic_and_covers_every_model():
    a = generate_trace(["m0", "m1", "m2"], 0.5, 200, seed=7)
    b = generate_trace(["m0", "m1", "m2"], 0.5, 200, seed=7)
    assert a == b
    assert [r.arrival for r in a] == sorted(r.arrival for r in a)
    assert {r.model for r in a} == {"m0", "m1", "m2"}
    assert trace_from_json(trace_to_json(a)) == a


def test_a_real_sharegpt_file_supplies_the_lengths(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "x" * 400},
                               {"from": "gpt", "value": "y" * 80}]}] * 3  # fmt: skip
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(rows))
    pairs = load_sharegpt(path)
    assert pairs == [(100, 20)] * 3
    trace = generate_trace(["m"], 1.0, 50, sharegpt=pairs, seed=0)
    assert {(r.prompt_len, r.output_len) for r in trace} == {(100, 20)}
