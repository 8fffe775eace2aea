"""Top-p (nucleus) keeps the most probable token whatever ``top_p`` is: top_p 0, which OpenAI
accepts, keeps only that token (and draws it), rather than cutting every token."""

from __future__ import annotations

import torch
from aegaeon.gpu_worker.sampler import choose, filtered_logits

from aegaeon.protocol import SamplingParams


def logits_row() -> torch.Tensor:
    """Close values, so a draw at temperature 1 picks other tokens than the top one."""
    return torch.linspace(-0.5, 0.5, 50).roll(7)


def test_top_p_zero_keeps_only_the_most_probable_token() -> None:
    row = logits_row()
    kept = filtered_logits(row, SamplingParams(temperature=1.0, top_p=0.0)).isfinite()
    assert kept.nonzero().flatten().tolist() == [int(row.argmax())]


def test_top_p_zero_at_temperature_one_always_draws_the_argmax() -> None:
    row = logits_row()
    sampling = SamplingParams(temperature=1.0, top_p=0.0)
    picks = {choose(row, sampling, [], seed=seed).token_id for seed in range(20)}
    assert picks == {int(row.argmax())}
    # The row is flat enough that without the cut the same seeds draw other tokens.
    unfiltered = SamplingParams(temperature=1.0)
    assert len({choose(row, unfiltered, [], seed=seed).token_id for seed in range(20)}) > 1


def test_top_p_keeps_the_token_that_crosses_it_and_no_more() -> None:
    row = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = filtered_logits(row, SamplingParams(temperature=1.0, top_p=0.6)).isfinite()
    assert kept.tolist() == [True, True, False, False]
