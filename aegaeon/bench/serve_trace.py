"""Pure parts of ``bench serve``: the CPU-scaled trace, token-id prompts, SLOs from isolated
latency, and client timings → :class:`~aegaeon.slo_metrics.RequestRecord`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from aegaeon.scheduler.policies.base import Slo
from aegaeon.slo_metrics import RequestRecord
from aegaeon.workload import SHAREGPT, LengthDist, TraceRequest

FIRST_PLAIN_TOKEN = 16  # ids below are kept clear of the demo tokenizers' special tokens


@dataclass(frozen=True)
class CpuScale:
    """How ShareGPT lengths shrink for CPU demo models (written into every result)."""

    # Outputs stay long next to the TTFT SLO, as in the paper's setting (~290 tokens at ~30 ms
    # against a 10 s TTFT): a request must outlast the TTFT SLO for head-of-line blocking to show.
    factor: float = 0.3
    min_input: int = 16
    max_input: int = 256
    min_output: int = 8
    max_output: int = 192

    def lengths(self) -> LengthDist:
        return SHAREGPT.scaled(self.factor, self.max_input, self.max_output)

    def describe(self) -> dict:
        dist = self.lengths()
        return {
            "sharegpt_length_factor": self.factor,
            "input_mean": dist.input_mean,
            "input_median": dist.input_median,
            "input_range": [self.min_input, self.max_input],
            "output_mean": dist.output_mean,
            "output_median": dist.output_median,
            "output_range": [self.min_output, self.max_output],
        }


def clamp_lengths(trace: Sequence[TraceRequest], scale: CpuScale) -> list[TraceRequest]:
    """Raise lengths to the scale's floors (and cap them), so every request has a TBT."""
    return [
        replace(
            r,
            prompt_len=int(np.clip(r.prompt_len, scale.min_input, scale.max_input)),
            output_len=int(np.clip(r.output_len, scale.min_output, scale.max_output)),
        )
        for r in trace
    ]


def prompt_ids(request: TraceRequest, vocab_size: int, seed: int = 0) -> list[int]:
    """A deterministic token-id prompt of the traced length (same ids under every policy)."""
    digest = sum(ord(c) * 31**i for i, c in enumerate(request.request_id)) % (1 << 31)
    rng = np.random.default_rng((seed, digest))
    ids = rng.integers(FIRST_PLAIN_TOKEN, vocab_size, request.prompt_len)
    return [int(i) for i in ids]


PAPER_TTFT_IN_TBT = 100.0
"""The paper's TTFT SLO in TBT SLOs (10 s against 100 ms), for ~290-token outputs."""


def scaled_slo(
    isolated_ttft_s: float, isolated_tbt_s: float, tbt_scale: float,
    ttft_scale: float | None = None, length_factor: float = CpuScale.factor,
) -> Slo:  # fmt: skip
    """SLOs from the isolated latency of the largest model (DESIGN.md §7): TBT = ``tbt_scale`` ×
    isolated TBT; TTFT = ``ttft_scale`` × isolated TTFT when given, else the paper's proportion
    kept: 100 TBT SLOs for outputs as long as the paper's, so 100 × ``length_factor`` TBT SLOs
    for outputs scaled by it. A request then decodes for about as long as the TTFT SLO, as in the
    paper (290 tokens at ~30 ms against 10 s), which is where queueing behind another model's
    requests costs a TTFT miss."""
    tbt = isolated_tbt_s * tbt_scale
    if ttft_scale is not None:
        return Slo(ttft_s=isolated_ttft_s * ttft_scale, tbt_s=tbt)
    return Slo(ttft_s=tbt * PAPER_TTFT_IN_TBT * length_factor, tbt_s=tbt)


def mean_gap(times: Sequence[float]) -> float | None:
    """Mean time between consecutive tokens (None with fewer than two)."""
    if len(times) < 2:
        return None
    return (times[-1] - times[0]) / (len(times) - 1)


def to_record(
    request: TraceRequest, sent_at: float, token_times: Sequence[float], ok: bool, origin: float
) -> RequestRecord:
    """Client timestamps (perf_counter) → a record on the trace's clock (``origin`` = t 0).

    The arrival is when the request was actually sent, not when the trace wanted it sent, so a
    slow client never hides in the server's numbers.
    """
    return RequestRecord(
        request_id=request.request_id,
        model=request.model,
        arrival=sent_at - origin,
        output_len=request.output_len,
        token_times=[t - origin for t in token_times],
        finished=ok,
    )
