"""Sampling values that once broke a whole batch: each is served alone, exactly as greedy or as a
clean draw, never an exception."""

from __future__ import annotations

import torch
from aegaeon.gpu_worker.sampler import choose, is_plain_greedy

from aegaeon.protocol import SamplingParams


def logits_row() -> torch.Tensor:
    return torch.linspace(-3.0, 3.0, 50).roll(7)


def test_a_tiny_positive_temperature_samples_greedily() -> None:
    row = logits_row()
    for temperature in (1e-300, 1e-30, 1e-6):
        sampling = SamplingParams(temperature=temperature, seed=1)
        assert choose(row, sampling, [], seed=1).token_id == int(row.argmax())
        assert is_plain_greedy(sampling)


def test_non_finite_logits_never_make_the_draw_raise() -> None:
    row = logits_row()
    row[3] = float("nan")
    row[5] = float("inf")
    sampling = SamplingParams(temperature=0.7, top_p=0.9, seed=3)
    picked = choose(row, sampling, [], seed=3).token_id
    assert 0 <= picked < row.numel()


def test_a_row_of_nans_falls_back_to_a_valid_token() -> None:
    row = torch.full((50,), float("nan"))
    for temperature in (0.0, 0.8):
        picked = choose(row, SamplingParams(temperature=temperature, seed=2), [], seed=2).token_id
        assert 0 <= picked < row.numel()
