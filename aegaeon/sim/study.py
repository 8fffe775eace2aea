"""The operator's question, per policy: how many GPUs does this trace need at these SLOs?

:func:`gpus_needed` answers it for one setting (one trace, every policy), every layout offered
at each GPU count; :mod:`aegaeon.sim.paper` runs the paper's study.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from aegaeon.scheduler.estimators import Estimator
from aegaeon.scheduler.policies.base import ModelSpec, Slo
from aegaeon.sim.hardware import DeviceSpec, paper_models, roofline_profile
from aegaeon.sim.nodes import NodeSetup
from aegaeon.sim.run import POLICIES, Deployment, Metric, Needed, fewest_gpus, run_deployment
from aegaeon.slo_metrics import ATTAINMENT_TARGET, summarize
from aegaeon.workload import TraceRequest, generate_trace

PAPER_POLICIES = ("aegaeon", "request-level", "sllm-plus", "static-mux", "dedicated")
ALL_POLICIES = tuple(p for p in PAPER_POLICIES if p in POLICIES)  # those registered
GUESS_SHARE = {"aegaeon": 0.2, "request-level": 0.45, "sllm-plus": 0.45, "static-mux": 0.3}
VIEWS = ("attainment", "time_fraction_attainment", "artifact_qos")


@dataclass(frozen=True)
class Setting:
    """One point of a study: models, per-model rate, SLOs, device, simulated duration."""

    models: int
    rate: float
    slo: Slo
    device: DeviceSpec
    duration: float = 300.0
    seed: int = 0
    slo_scale: float = 1.0


def summary(gpus: int | None, deployment: Deployment, metrics: dict, models: int) -> dict:
    """What a study reports for one policy at one setting."""
    return {
        "gpus": gpus,
        "layout": deployment.to_json(),
        "models_per_gpu": round(models / gpus, 3) if gpus else None,
        **{view: round(metrics[view], 4) for view in VIEWS},
        "ttft_p90_s": metrics["ttft_s"]["p90"],
        "tbt_p99_s": metrics["tbt_s"]["p99"],
    }


def gpus_needed(
    trace: Sequence[TraceRequest],
    models: dict[str, ModelSpec],
    cost: Estimator,
    setting: Setting,
    policies: Sequence[str] = ALL_POLICIES,
    metric: Metric = "attainment",
    on_run: Callable[[], None] | None = None,
    nodes: NodeSetup | None = None,
    fleet_gpus: int | None = None,
) -> dict[str, dict]:
    """Fewest GPUs per policy reaching ≥ 90% ``metric`` on ``trace`` (dedicated: one per model,
    checked, not searched; the others searched in [1, models]). ``nodes``: the GPUs sit on
    nodes with host caches (:mod:`aegaeon.sim.nodes`); ``fleet_gpus`` caps the search (and
    dedicated's check) at a fleet's size. With either, each result also says what was fetched,
    how many runs its search took and their wall time."""
    n = len(models)
    high = min(n, fleet_gpus) if fleet_gpus else n
    fleet = nodes is not None or bool(fleet_gpus)
    # A fleet's search stops a strict run once it cannot pass: same answer, far fewer events.
    stop = ATTAINMENT_TARGET if fleet and metric == "attainment" else None
    out: dict[str, dict] = {}
    for policy in policies:

        def run(deployment: Deployment, policy: str = policy, stop: float | None = stop):
            result = run_deployment(trace, policy, deployment, models, setting.device, cost,
                                    setting.slo, nodes, stop)  # fmt: skip
            if on_run:
                on_run()
            return result

        started = time.monotonic()
        if policy == "dedicated":  # one run, in full
            result = run(Deployment(high), stop=None)
            ok = high == n and result.metrics[metric] >= 0.9
            out[policy] = summary(n if ok else None, Deployment(high), result.metrics, n)
            needed = Needed(n if ok else None, Deployment(high), result, 1)
        else:
            guess = max(1, min(high, round(n * GUESS_SHARE.get(policy, 0.5))))
            needed = fewest_gpus(policy, run, 1, high, guess=guess, metric=metric)
            metrics = needed.result.metrics
            if stop is not None:  # the search measured only pass or fail: the answer in full
                metrics = summarize(needed.result.records, setting.slo)
            out[policy] = summary(needed.gpus, needed.deployment, metrics, n)
        if fleet:
            out[policy].update(fetches=needed.result.fetches, runs=needed.runs,
                               fetch_wait_s=round(needed.result.fetch_wait_s, 1),
                               stopped_early=needed.result.stopped_early,
                               search_wall_s=round(time.monotonic() - started, 1))  # fmt: skip
    return out


def paper_setting_trace(setting: Setting) -> tuple[dict[str, ModelSpec], list[TraceRequest]]:
    """The paper's models (60/20/20 mix) and a Poisson ShareGPT-like trace over them."""
    models = paper_models(setting.models)
    trace = generate_trace(list(models), setting.rate, setting.duration, seed=setting.seed)
    return models, trace


def roofline_estimator(models: dict[str, ModelSpec], device: DeviceSpec) -> Estimator:
    """A cost model of ``models`` on ``device`` from its peak numbers."""
    return Estimator({m: roofline_profile(s, device) for m, s in models.items()}, device.name)
