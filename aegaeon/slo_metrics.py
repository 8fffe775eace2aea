"""Latency and SLO metrics, defined once for the benchmark and the simulator (DESIGN.md §7).

- TTFT: arrival → first token; TBT: gap between consecutive tokens; TPOT: (e2e − TTFT)/(n − 1);
  e2e: arrival → last token (vLLM's serving-benchmark meanings).
- Per-request attainment: the request finished and token *k* (1-based) came by its deadline
  ``arrival + SLO_TTFT + (k − 1)·SLO_TBT``.
- Time-fraction score (ours, not the artifact's): the share of a request's service time
  (arrival → last token) during which it was on schedule, i.e. not behind a missed deadline;
  0 for an unfinished request.
- Artifact QoS: the paper artifact's own per-request score, by which the paper's figures are
  drawn (:func:`artifact_qos_score`, a line-by-line port).

``summarize`` reports the three views under their own names: ``attainment`` (strict),
``time_fraction_attainment`` and ``artifact_qos``.
- Goodput: the highest rate whose attainment is ≥ 90%.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

ATTAINMENT_TARGET = 0.9


class SloLike(Protocol):
    """Anything with the two targets (``aegaeon.scheduler.policies.base.Slo`` fits)."""

    @property
    def ttft_s(self) -> float: ...

    @property
    def tbt_s(self) -> float: ...


@dataclass
class RequestRecord:
    """What a client (or the simulator) saw of one request: when each token arrived."""

    request_id: str
    model: str
    arrival: float
    output_len: int  # tokens asked for; a finished request has this many token times
    token_times: Sequence[float]
    finished: bool = True


def deadlines(record: RequestRecord, slo: SloLike, count: int) -> np.ndarray:
    """Deadline of each of the first ``count`` tokens."""
    return record.arrival + slo.ttft_s + np.arange(count) * slo.tbt_s


def meets_slo(record: RequestRecord, slo: SloLike) -> bool:
    """The per-request view: finished, and every token by its deadline."""
    times = np.asarray(record.token_times, dtype=float)
    if not record.finished or times.size == 0:
        return False
    return bool(np.all(times <= deadlines(record, slo, times.size) + 1e-9))


def late_time(times: np.ndarray, due: np.ndarray) -> float:
    """Length of the union of the intervals [due_k, t_k] where token k came late.

    Both sequences increase, so a sweep merging overlapping intervals suffices.
    """
    late = times > due
    if not late.any():
        return 0.0
    starts, ends = due[late], times[late]
    total, cur_start, cur_end = 0.0, starts[0], ends[0]
    for start, end in zip(starts[1:], ends[1:], strict=True):
        if start > cur_end:
            total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    return float(total + cur_end - cur_start)


def time_fraction_score(record: RequestRecord, slo: SloLike) -> float:
    """Our time-fraction view: share of the service time spent on schedule (0 if unfinished)."""
    times = np.asarray(record.token_times, dtype=float)
    if not record.finished or times.size == 0:
        return 0.0
    span = times[-1] - record.arrival
    if span <= 0:
        return 1.0
    return max(0.0, 1.0 - late_time(times, deadlines(record, slo, times.size)) / span)


def artifact_qos_score(record: RequestRecord, slo: SloLike) -> float:
    """The paper artifact's per-request QoS score, ported exactly from
    ``aegaeon/aegaeon/utils.py`` ``compute_request_metrics`` in
    github.com/MachineLearningSystem/25SOSP-Aegaeon (the same loop is in
    ``aegaeon/plots/plot_e2e.py`` ``compute_slo`` / ``compute_slo_sim``, which draw the figures).

    Walk the tokens with ``target`` starting at SLO_TTFT and growing by SLO_TBT per token,
    measured from a segment ``start`` (first: the arrival). A token with ``t − start ≤ target``
    sets ``accum = target`` (the target before this token's increment); a late one banks
    ``accum``, starts a new segment at that token and zeroes ``accum``; ``target`` never resets.
    Score = (banked + min(target, last − start)) / (last − arrival), where ``target`` is the
    value after the last token's increment. A request that did not produce all its tokens
    scores 0 (the artifact's ``compute_request_metrics`` and ``compute_slo_sim`` do so;
    its ``compute_slo`` skips such requests instead). A zero-length span (last token at the
    arrival, which the artifact would divide by) scores 1.
    """
    times = list(record.token_times)
    if not record.finished or not times:
        return 0.0
    qos = 0.0
    start = record.arrival
    accum = 0.0
    target = slo.ttft_s
    for token in times:
        if token - start <= target:
            accum = target
        else:
            qos += accum
            start = token
            accum = 0.0
        target += slo.tbt_s
    span = times[-1] - record.arrival
    if span <= 0:
        return 1.0
    qos += min(target, times[-1] - start)
    return qos / span


def latencies(record: RequestRecord) -> tuple[float | None, float | None, float | None, list]:
    """(TTFT, TPOT, e2e, TBTs) of one request; None where undefined."""
    times = np.asarray(record.token_times, dtype=float)
    if times.size == 0:
        return None, None, None, []
    ttft = float(times[0] - record.arrival)
    e2e = float(times[-1] - record.arrival) if record.finished else None
    tpot = (e2e - ttft) / (times.size - 1) if e2e is not None and times.size > 1 else None
    return ttft, tpot, e2e, np.diff(times).tolist()


def percentiles(values: Iterable[float]) -> dict[str, float | None]:
    """mean, p50, p90, p99 and max (None for an empty list)."""
    arr = np.asarray(list(values), dtype=float)
    if arr.size == 0:
        return {"mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {
        "mean": float(arr.mean()),
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "max": float(arr.max()),
    }


def summarize(records: Sequence[RequestRecord], slo: SloLike) -> dict:
    """Every metric of a run: latency percentiles and the three attainment views
    (``attainment`` strict per request, ``time_fraction_attainment``, ``artifact_qos``)."""
    ttfts, tpots, e2es, tbts = [], [], [], []
    for record in records:
        ttft, tpot, e2e, gaps = latencies(record)
        if ttft is not None:
            ttfts.append(ttft)
        if tpot is not None:
            tpots.append(tpot)
        if e2e is not None:
            e2es.append(e2e)
        tbts.extend(gaps)
    count = len(records)
    met = sum(meets_slo(r, slo) for r in records)
    score = sum(time_fraction_score(r, slo) for r in records)
    qos = sum(artifact_qos_score(r, slo) for r in records)
    return {
        "requests": count,
        "finished": sum(r.finished for r in records),
        "slo_ttft_s": slo.ttft_s,
        "slo_tbt_s": slo.tbt_s,
        "attainment": met / count if count else 1.0,
        "time_fraction_attainment": score / count if count else 1.0,
        "artifact_qos": qos / count if count else 1.0,
        "ttft_s": percentiles(ttfts),
        "tbt_s": percentiles(tbts),
        "tpot_s": percentiles(tpots),
        "e2e_s": percentiles(e2es),
    }


def goodput(points: Iterable[tuple[float, float]], target: float = ATTAINMENT_TARGET) -> float:
    """The highest rate (first of each pair) at and below which every measured rate's attainment
    (second) is ≥ ``target``; 0 when the lowest rate misses. A pass above a miss does not count:
    it is luck, not capacity."""
    good = 0.0
    for rate, attained in sorted(points):
        if attained < target:
            break
        good = rate
    return good
