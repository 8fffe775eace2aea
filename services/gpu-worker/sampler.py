"""Per-request token choice: penalties, logit bias, greedy / temperature / top-k / top-p, seeds,
logprobs.

Seeded sampling is a pure function of (seed, token index, logits): each token draws from a
generator seeded with both, so a request that is preempted, recomputed or recovered elsewhere
draws exactly the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aegaeon.protocol import SamplingParams

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, index) over 63 bits

MIN_TEMPERATURE = 1e-5
"""Below this a temperature samples greedily: ``logits / temperature`` would overflow float32
(a tiny positive temperature such as 1e-300 is 0 in float32) and the softmax is one-hot anyway."""


def is_greedy(sampling: SamplingParams) -> bool:
    return sampling.temperature < MIN_TEMPERATURE


@dataclass
class Choice:
    """The sampler's pick for one request at one step."""

    token_id: int
    logprob: float | None
    top_logprobs: list[tuple[int, float]]


def is_plain_greedy(sampling: SamplingParams) -> bool:
    """Greedy with nothing that needs per-row work (lets a batch take one argmax)."""
    return (
        is_greedy(sampling)
        and sampling.presence_penalty == 0.0
        and sampling.frequency_penalty == 0.0
        and not sampling.logit_bias
        and sampling.logprobs is None
    )


def token_seed(seed: int, index: int) -> int:
    return ((seed * _MIX) ^ (index * 0x2545F4914F6CDD1D) ^ index) & ((1 << 63) - 1)


def apply_penalties(
    logits: torch.Tensor, sampling: SamplingParams, outputs: list[int]
) -> torch.Tensor:
    """OpenAI-style presence/frequency penalties over the tokens generated so far."""
    if not outputs or (sampling.presence_penalty == 0.0 and sampling.frequency_penalty == 0.0):
        return logits
    ids, counts = torch.tensor(outputs, device=logits.device).unique(return_counts=True)
    penalty = sampling.frequency_penalty * counts.to(logits.dtype) + sampling.presence_penalty
    logits = logits.clone()
    logits[ids] -= penalty
    return logits


def apply_logit_bias(logits: torch.Tensor, sampling: SamplingParams) -> torch.Tensor:
    """OpenAI's ``logit_bias``: each listed token's logit plus its bias (±100 bans or forces
    it). Ids past the row (the gateway checks them against the tokenizer) are left out."""
    if not sampling.logit_bias:
        return logits
    ids = [t for t in sampling.logit_bias if 0 <= t < logits.numel()]
    if not ids:
        return logits
    bias = torch.tensor([sampling.logit_bias[t] for t in ids], dtype=logits.dtype, device=logits.device)  # fmt: skip
    logits = logits.clone()
    logits[torch.tensor(ids, device=logits.device)] += bias
    return logits


def filtered_logits(logits: torch.Tensor, sampling: SamplingParams) -> torch.Tensor:
    """One row's logits to draw from: scaled by temperature, then cut by top-k and top-p (a
    token cut is -inf). Top-p keeps the fewest most probable tokens whose probabilities reach
    ``top_p``, and never fewer than one: top_p 0 keeps only the most probable token."""
    logits = logits / sampling.temperature
    if sampling.top_k > 0 and sampling.top_k < logits.numel():
        kth = torch.topk(logits, sampling.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= sampling.top_p  # keep the token crossing p
        drop[0] = False  # the most probable token always stays
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def choose(logits: torch.Tensor, sampling: SamplingParams, outputs: list[int], seed: int) -> Choice:
    """Pick token number ``len(outputs)`` from one row of float32 logits. Logprobs are the
    model's own, before penalties and bias (as vLLM reports them by default)."""
    adjusted = apply_logit_bias(apply_penalties(logits, sampling, outputs), sampling)
    token = _sample(adjusted, sampling, token_seed(seed, len(outputs)))
    if sampling.logprobs is None:
        return Choice(token, None, [])
    logprobs = torch.log_softmax(logits.float(), -1)
    top: list[tuple[int, float]] = []
    if sampling.logprobs > 0:
        values, ids = torch.topk(logprobs, min(sampling.logprobs, logprobs.numel()))
        top = [(int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
    return Choice(token, float(logprobs[token]), top)


def _sample(logits: torch.Tensor, sampling: SamplingParams, seed: int) -> int:
    """Greedy below MIN_TEMPERATURE; else a seeded draw from probabilities cleaned of NaN and
    infinities (a row with nothing left to draw from falls back to its argmax), so no request's
    values can make the draw raise."""
    if is_greedy(sampling):
        return int(torch.argmax(torch.nan_to_num(logits, nan=float("-inf"))))
    probs = filtered_logits(logits.float(), sampling).softmax(-1)
    probs = torch.nan_to_num(probs, nan=0.0, posinf=0.0, neginf=0.0)
    if not bool(probs.sum() > 0):
        return int(torch.argmax(torch.nan_to_num(logits, nan=float("-inf"))))
    generator = torch.Generator(device=probs.device).manual_seed(seed)
    return int(torch.multinomial(probs, 1, generator=generator))


def finish_reason(token: int, produced: int, sampling: SamplingParams, eos_ids: tuple[int, ...]) -> str | None:  # fmt: skip
    """ "stop" on a stop/EOS token, "length" when ``produced`` tokens reach max_tokens."""
    if token in sampling.stop_token_ids or (not sampling.ignore_eos and token in eos_ids):
        return "stop"
    if produced >= sampling.max_tokens:
        return "length"
    return None
