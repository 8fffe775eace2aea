"""Trace generation for benchmarks and the simulator (pure: no I/O except reading a ShareGPT file).

A trace is a list of :class:`TraceRequest` sorted by arrival. Arrivals are per model, Poisson
(exponential gaps) or Gamma (gaps with a chosen coefficient of variation: CV > 1 is bursty).
Models get a share of the total rate: uniform, or Zipf (model *i* ∝ 1/i^s). Lengths follow
ShareGPT (DESIGN.md §7): lognormal fits to input mean≈700/median≈540 and output
mean≈290/median≈260 tokens, clipped; or pairs sampled from a real ShareGPT JSON file.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np

ArrivalKind = Literal["poisson", "gamma"]
Popularity = Literal["uniform", "zipf"]


@dataclass(frozen=True)
class TraceRequest:
    """One request of a trace: which model, when, and how long its prompt and output are."""

    request_id: str
    model: str
    arrival: float
    prompt_len: int
    output_len: int


@dataclass(frozen=True)
class LengthDist:
    """Lognormal prompt and output lengths given by mean and median, clipped to [1, max]."""

    input_mean: float = 700.0
    input_median: float = 540.0
    output_mean: float = 290.0
    output_median: float = 260.0
    max_input: int = 4096
    max_output: int = 2048

    def scaled(self, factor: float, max_input: int, max_output: int) -> LengthDist:
        """The same shape shrunk by ``factor`` (CPU demo models need short requests)."""
        return replace(
            self,
            input_mean=self.input_mean * factor,
            input_median=self.input_median * factor,
            output_mean=self.output_mean * factor,
            output_median=self.output_median * factor,
            max_input=max_input,
            max_output=max_output,
        )


SHAREGPT = LengthDist()


def lognormal_params(mean: float, median: float) -> tuple[float, float]:
    """(mu, sigma) of the lognormal with this mean and median (mean = median·e^{σ²/2})."""
    if mean < median:
        raise ValueError("a lognormal's mean is at least its median")
    return math.log(median), math.sqrt(2.0 * math.log(mean / median))


def sample_lengths(
    dist: LengthDist, count: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` (prompt, output) lengths drawn from ``dist``."""
    mu_in, sd_in = lognormal_params(dist.input_mean, dist.input_median)
    mu_out, sd_out = lognormal_params(dist.output_mean, dist.output_median)
    prompts = np.clip(np.rint(rng.lognormal(mu_in, sd_in, count)), 1, dist.max_input)
    outputs = np.clip(np.rint(rng.lognormal(mu_out, sd_out, count)), 1, dist.max_output)
    return prompts.astype(int), outputs.astype(int)


def model_rates(
    total_rate: float, n_models: int, popularity: Popularity, zipf_s: float = 1.0
) -> np.ndarray:
    """Per-model arrival rates summing to ``total_rate``."""
    weights: np.ndarray
    if popularity == "uniform":
        weights = np.ones(n_models)
    elif popularity == "zipf":
        weights = 1.0 / np.arange(1, n_models + 1) ** zipf_s
    else:
        raise ValueError(f"unknown popularity {popularity!r}")
    return total_rate * weights / weights.sum()


def arrival_times(
    rate: float, duration: float, rng: np.random.Generator, kind: ArrivalKind = "poisson",
    cv: float = 1.0,
) -> np.ndarray:  # fmt: skip
    """Arrival instants in [0, duration) of a renewal process with mean rate ``rate``.

    Gamma gaps with shape 1/CV² have mean 1/rate and coefficient of variation CV; CV = 1 is
    Poisson, CV > 1 is bursty.
    """
    if rate <= 0:
        return np.empty(0)
    expected = int(rate * duration * 1.5) + 16
    if kind == "poisson":
        gaps = rng.exponential(1.0 / rate, expected)
    elif kind == "gamma":
        shape = 1.0 / (cv * cv)
        gaps = rng.gamma(shape, 1.0 / (rate * shape), expected)
    else:
        raise ValueError(f"unknown arrival kind {kind!r}")
    times = np.cumsum(gaps)
    while times[-1] < duration:  # rare: draw more gaps
        times = np.concatenate([times, times[-1] + np.cumsum(gaps)])
    return times[times < duration]


def generate_trace(
    models: Sequence[str],
    rate_per_model: float,
    duration: float,
    *,
    popularity: Popularity = "uniform",
    zipf_s: float = 1.0,
    arrival: ArrivalKind = "poisson",
    cv: float = 1.0,
    lengths: LengthDist = SHAREGPT,
    sharegpt: Sequence[tuple[int, int]] | None = None,
    seed: int = 0,
) -> list[TraceRequest]:
    """A trace over ``models`` with mean rate ``rate_per_model`` each (total = N·rate).

    With ``sharegpt`` (pairs from :func:`load_sharegpt`), lengths are sampled from it instead
    of the lognormal fit.
    """
    rng = np.random.default_rng(seed)
    rates = model_rates(rate_per_model * len(models), len(models), popularity, zipf_s)
    arrivals: list[tuple[float, str]] = []
    for model, rate in zip(models, rates, strict=True):
        arrivals.extend((float(t), model) for t in arrival_times(rate, duration, rng, arrival, cv))
    arrivals.sort()
    if sharegpt:
        picks = rng.integers(0, len(sharegpt), len(arrivals))
        prompts = np.array([sharegpt[i][0] for i in picks], dtype=int)
        outputs = np.array([sharegpt[i][1] for i in picks], dtype=int)
        prompts = np.clip(prompts, 1, lengths.max_input)
        outputs = np.clip(outputs, 1, lengths.max_output)
    else:
        prompts, outputs = sample_lengths(lengths, len(arrivals), rng)
    return [
        TraceRequest(f"r{i:06d}", model, t, int(prompts[i]), int(outputs[i]))
        for i, (t, model) in enumerate(arrivals)
    ]


def approx_tokens(text: str) -> int:
    """A tokenizer-free length estimate (≈4 characters per token for English BPE)."""
    return max(1, round(len(text) / 4))


def load_sharegpt(
    path: str | Path, tokenize: Callable[[str], int] = approx_tokens, limit: int | None = None
) -> list[tuple[int, int]]:
    """(prompt, output) token lengths of the first human→gpt exchange of each conversation
    in a ShareGPT JSON file (a list of ``{"conversations": [{"from", "value"}, ...]}``)."""
    data = json.loads(Path(path).read_text())
    pairs: list[tuple[int, int]] = []
    for item in data:
        turns = item.get("conversations") or item.get("conversation") or []
        for first, second in itertools.pairwise(turns):
            if first.get("from") in ("human", "user") and second.get("from") in (
                "gpt",
                "assistant",
            ):
                pairs.append((tokenize(first["value"]), tokenize(second["value"])))
                break
        if limit is not None and len(pairs) >= limit:
            break
    if not pairs:
        raise ValueError(f"{path}: no human→gpt exchanges found")
    return pairs


def trace_to_json(trace: Sequence[TraceRequest]) -> list[dict]:
    """A JSON-ready form of a trace."""
    return [r.__dict__.copy() for r in trace]


def trace_from_json(rows: Sequence[dict]) -> list[TraceRequest]:
    """The inverse of :func:`trace_to_json`."""
    return [TraceRequest(**row) for row in rows]
