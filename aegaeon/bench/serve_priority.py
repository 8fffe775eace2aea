"""``bench serve`` with priority classes (``--priorities``, ``--priority-trace``): which class each
model gets, and what each class saw. Pure.

The priority trace puts the most popular model (Zipf popularity: the first model takes the
largest share) in the ``high`` class and every other model in ``low``, so that at the higher
rates the high model's load alone keeps the workers busy. What it shows, per class and rate:
attainment, and whether each low request's first token came within the scheduler's maximum
wait (``--max-wait``) — the bound that keeps a lower class from starving.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from aegaeon.priority import check_priority
from aegaeon.scheduler.policies.base import ModelSpec
from aegaeon.slo_metrics import RequestRecord, SloLike, summarize

PRIORITY_TRACE_CLASSES = "high,low"
"""The first model high, the others low (the last class given repeats)."""
PRIORITY_TRACE_ZIPF_S = 1.5  # with 5 models the high one takes 57% of the requests
MAX_WAIT_IN_TTFT = 2.0
"""Default maximum wait with classes: this many TTFT SLOs (the scheduler's own default, 30 s,
is longer than a whole CPU rate point)."""


def classes_for(names: Sequence[str], spec: str) -> dict[str, str]:
    """``"high,low"`` → each model's class, in order; the last class given repeats. Raises
    ValueError naming a bad class."""
    given = [check_priority(c.strip()) for c in spec.split(",") if c.strip()]
    if not given:
        raise ValueError("--priorities names no class")
    return {name: given[min(i, len(given) - 1)] for i, name in enumerate(names)}


def with_classes(
    specs: Mapping[str, ModelSpec], classes: Mapping[str, str]
) -> dict[str, ModelSpec]:
    """The specs with each model's class (what the simulator's policy is given)."""
    out = {}
    for name, spec in specs.items():
        out[name] = ModelSpec(spec.name, spec.weight_bytes, spec.kv_bytes_per_token,
                              spec.context_length, classes.get(name, spec.priority))  # fmt: skip
    return out


def first_token_wait(record: RequestRecord) -> float | None:
    """Seconds from arrival to the first token (None: none came)."""
    return record.token_times[0] - record.arrival if record.token_times else None


def by_class(
    records: Sequence[RequestRecord], classes: Mapping[str, str], slo: SloLike, max_wait_s: float
) -> dict[str, dict]:
    """Per class: the point's attainment views and latencies (:func:`summarize`), the longest
    first-token wait, and the share of requests whose first token came within ``max_wait_s``
    (a request without one counts as not within)."""
    out = {}
    for cls in sorted(set(classes.values())):
        mine = [r for r in records if classes.get(r.model) == cls]
        if not mine:
            continue
        waits = [first_token_wait(r) for r in mine]
        seen = [w for w in waits if w is not None]
        within = sum(w is not None and w <= max_wait_s for w in waits)
        out[cls] = {
            **{
                k: v
                for k, v in summarize(mine, slo).items()
                if k not in ("slo_ttft_s", "slo_tbt_s")
            },
            "max_first_token_wait_s": max(seen) if seen else None,
            "within_max_wait": within / len(mine),
        }
    return out
