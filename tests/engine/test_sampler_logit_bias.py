"""OpenAI's logit_bias in the sampler: +100 forces a token, -100 bans one, whatever the
temperature; logprobs stay the model's own; a biased greedy row is not batched as plain greedy."""

from __future__ import annotations

import torch
from aegaeon.gpu_worker.sampler import choose, is_plain_greedy

from aegaeon.protocol import SamplingParams


def logits_row() -> torch.Tensor:
    return torch.linspace(-3.0, 3.0, 50).roll(7)


def test_a_large_bias_forces_its_token_greedy_or_sampled() -> None:
    row = logits_row()
    for temperature in (0.0, 1.0):
        sampling = SamplingParams(temperature=temperature, seed=4, logit_bias={11: 100.0})
        assert choose(row, sampling, [], seed=4).token_id == 11


def test_a_ban_moves_greedy_to_the_next_best_token() -> None:
    row = logits_row()
    best, second = torch.topk(row, 2).indices.tolist()
    sampling = SamplingParams(temperature=0.0, logit_bias={best: -100.0})
    assert not is_plain_greedy(sampling)  # a batch's one argmax would ignore the bias
    assert choose(row, sampling, [], seed=0).token_id == second


def test_logprobs_are_the_models_own_and_ids_past_the_row_are_left_out() -> None:
    row = logits_row()
    sampling = SamplingParams(temperature=0.0, logprobs=1, logit_bias={11: 100.0, 10_000: 5.0})
    chosen = choose(row, sampling, [], seed=0)
    assert chosen.token_id == 11
    assert chosen.logprob == float(torch.log_softmax(row, -1)[11])
    assert chosen.top_logprobs[0][0] == int(row.argmax())
