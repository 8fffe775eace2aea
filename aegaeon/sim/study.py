"""The operator's question, per policy: how many GPUs does this trace need at these SLOs?

:func:`gpus_needed` answers it for one setting (one trace, every policy); :func:`paper_study`
sweeps the paper's settings (DESIGN.md §7) and picks out the headline point.
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


def run_setting(
    setting: Setting,
    policies: Sequence[str] = ALL_POLICIES,
    metric: Metric = "attainment",
    on_run: Callable[[], None] | None = None,
) -> dict:
    """One point of the paper study."""
    models, trace = paper_setting_trace(setting)
    cost = roofline_estimator(models, setting.device)
    return {
        "models": setting.models,
        "rate_per_model": setting.rate,
        "slo_scale": setting.slo_scale,
        "slo": {"ttft_s": setting.slo.ttft_s, "tbt_s": setting.slo.tbt_s},
        "requests": len(trace),
        "duration_s": setting.duration,
        "metric": metric,
        "policies": gpus_needed(trace, models, cost, setting, policies, metric, on_run),
    }


def headline(point: dict) -> dict:
    """The issue's goals at one point: GPUs of aegaeon over dedicated (≤ 0.18) and aegaeon's
    models per GPU over request-level's (≥ 2)."""
    pol = point["policies"]
    aeg = pol.get("aegaeon", {}).get("gpus")
    ded = pol.get("dedicated", {}).get("gpus") or point["models"]
    ratio = aeg / ded if aeg else None
    req_gpus = pol.get("request-level", {}).get("gpus")
    mpg = (req_gpus / aeg) if aeg and req_gpus else None
    return {
        "models": point["models"],
        "rate_per_model": point["rate_per_model"],
        "slo_scale": point["slo_scale"],
        "metric": point["metric"],
        "gpus": {p: v["gpus"] for p, v in pol.items()},
        "gpus_vs_dedicated": round(ratio, 4) if ratio else None,
        "gpus_vs_dedicated_goal": 0.18,
        "models_per_gpu_vs_request_level": round(mpg, 3) if mpg else None,
        "models_per_gpu_vs_request_level_goal": 2.0,
    }


def paper_settings(
    device: DeviceSpec,
    model_counts: Sequence[int] = (16, 32, 48, 64, 80),
    rates: Sequence[float] = (0.1, 0.5),
    slo_scales: Sequence[float] = (1.0, 0.5, 0.3),
    duration_for: Callable[[float], float] = lambda rate: 300.0 if rate <= 0.1 else 120.0,
    base: Slo = Slo(10.0, 0.1),
) -> list[Setting]:
    """The paper's grid; shorter traces at the higher rate keep the request count similar."""
    return [
        Setting(n, rate, Slo(base.ttft_s * k, base.tbt_s * k), device, duration_for(rate),
                slo_scale=k)
        for k in slo_scales
        for rate in rates
        for n in model_counts
    ]  # fmt: skip
