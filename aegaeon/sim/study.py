"""The operator's question, per policy: how many GPUs does this trace need at these SLOs?

:func:`gpus_needed` answers it for one setting (one trace, every policy), every layout offered
at each GPU count; :mod:`aegaeon.sim.paper` runs the paper's study.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from aegaeon.scheduler.estimators import Estimator
from aegaeon.scheduler.policies.base import ModelSpec, Slo
from aegaeon.sim.hardware import DeviceSpec, paper_models, roofline_profile
from aegaeon.sim.run import POLICIES, Deployment, Metric, fewest_gpus, run_deployment
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
) -> dict[str, dict]:
    """Fewest GPUs per policy reaching ≥ 90% ``metric`` on ``trace`` (dedicated: one per model,
    checked, not searched; the others searched in [1, models])."""
    n = len(models)
    out: dict[str, dict] = {}
    for policy in policies:

        def run(deployment: Deployment, policy: str = policy):
            result = run_deployment(
                trace, policy, deployment, models, setting.device, cost, setting.slo
            )
            if on_run:
                on_run()
            return result

        if policy == "dedicated":
            result = run(Deployment(n))
            ok = result.metrics[metric] >= 0.9
            out[policy] = summary(n if ok else None, Deployment(n), result.metrics, n)
            continue
        guess = max(1, round(n * GUESS_SHARE.get(policy, 0.5)))
        needed = fewest_gpus(policy, run, 1, n, guess=guess, metric=metric)
        out[policy] = summary(needed.gpus, needed.deployment, needed.result.metrics, n)
    return out


def paper_setting_trace(setting: Setting) -> tuple[dict[str, ModelSpec], list[TraceRequest]]:
    """The paper's models (60/20/20 mix) and a Poisson ShareGPT-like trace over them."""
    models = paper_models(setting.models)
    trace = generate_trace(list(models), setting.rate, setting.duration, seed=setting.seed)
    return models, trace


def roofline_estimator(models: dict[str, ModelSpec], device: DeviceSpec) -> Estimator:
    """A cost model of ``models`` on ``device`` from its peak numbers."""
    return Estimator({m: roofline_profile(s, device) for m, s in models.items()}, device.name)
