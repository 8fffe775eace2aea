"""``aegaeon sim --paper``: the paper's end-to-end setting (DESIGN.md §7) in simulation.

16 H800 GPUs as 2 nodes of 8; 16–80 models (to 144 at λ 0.1) in the 60/20/20 mix of 7B/9B/13B; Poisson arrivals
of λ = 0.1 and 0.5 requests/s per model with ShareGPT-like lengths; SLO ×1 (TTFT 10 s, TBT
100 ms), ×0.5 and ×0.3. At every point each policy runs every layout it is offered
(:mod:`aegaeon.sim.layout`) and reports the three attainment views of
:func:`aegaeon.slo_metrics.summarize`, each with the layout that gave it.

The figures it writes:

- ``models_at_90_vs_sllm_plus`` / ``…_vs_static_mux`` (and ``…_vs_request_level``): the most
  models aegaeon serves at ≥ 90% on 16 GPUs (λ 0.1, SLO ×1) over the baseline's, in the
  artifact's QoS view (what the paper plots), with ``…_strict`` beside it. "Serves N" means
  every model count of the grid up to N passes.
- ``gpus_vs_dedicated``: at 80 models (λ 0.1, SLO ×1) the fewest GPUs with which aegaeon keeps
  ≥ 90% strict attainment, over dedicated's 80.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from aegaeon.scheduler.policies.base import Slo
from aegaeon.sim.hardware import DeviceSpec
from aegaeon.sim.layout import GPUS_PER_NODE, layouts_for
from aegaeon.sim.run import run_deployment
from aegaeon.sim.study import (
    ALL_POLICIES,
    VIEWS,
    Setting,
    gpus_needed,
    paper_setting_trace,
    roofline_estimator,
)

TARGET = 0.9
PAPER_SLO = Slo(10.0, 0.1)
BASELINES = {"sllm_plus": "sllm-plus", "static_mux": "static-mux", "request_level": "request-level"}


@dataclass(frozen=True)
class PaperGrid:
    """The points of the study."""

    gpus: int = 16
    counts: dict[float, tuple[int, ...]] | None = None  # rate → model counts
    slo_scales: tuple[float, ...] = (1.0, 0.5, 0.3)
    duration_s: dict[float, float] | None = None  # rate → simulated seconds of arrivals
    headline_models: int = 80
    base: Slo = PAPER_SLO

    def model_counts(self, rate: float) -> tuple[int, ...]:
        # Past the paper's 80 at λ 0.1, so that a policy still at 90% there has a measured
        # limit (not a lower bound at the grid's end).
        default = {0.1: (*range(16, 81, 8), 96, 112, 128, 144), 0.5: tuple(range(16, 49, 8))}
        return (self.counts or default).get(rate, default[0.1])

    def duration(self, rate: float) -> float:
        # Shorter traces at the higher rate keep the request count similar.
        return (self.duration_s or {0.1: 300.0, 0.5: 120.0}).get(rate, 300.0)

    @property
    def rates(self) -> tuple[float, ...]:
        return tuple(sorted(self.counts)) if self.counts else (0.1, 0.5)


FULL = PaperGrid()
QUICK = PaperGrid(counts={0.1: (16, 48, 80), 0.5: (16, 32, 48)}, slo_scales=(1.0,))


def run_point(
    setting: Setting, gpus: int, policies: Sequence[str], on_run: Callable[[], None] | None = None
) -> dict:
    """Every policy at ``gpus`` GPUs on one trace: each offered layout run, the best per view."""
    models, trace = paper_setting_trace(setting)
    cost = roofline_estimator(models, setting.device)
    out: dict[str, dict] = {}
    for policy in policies:
        tried = []
        for deployment in layouts_for(policy, gpus):
            metrics = run_deployment(trace, policy, deployment, models, setting.device, cost,
                                     setting.slo).metrics  # fmt: skip
            tried.append({"layout": deployment.to_json(),
                          **{v: round(metrics[v], 4) for v in VIEWS}})  # fmt: skip
            if on_run:
                on_run()
        out[policy] = {view: _best(tried, view) for view in VIEWS}
        out[policy]["layouts_tried"] = tried
    return {"models": setting.models, "rate_per_model": setting.rate,
            "slo_scale": setting.slo_scale, "slo": {"ttft_s": setting.slo.ttft_s,
            "tbt_s": setting.slo.tbt_s}, "gpus": gpus, "requests": len(trace),
            "duration_s": setting.duration, "policies": out}  # fmt: skip


def _best(tried: list[dict], view: str) -> dict:
    top = max(tried, key=lambda row: row[view])
    return {"value": top[view], "layout": top["layout"]["name"]}


def models_at_target(points: list[dict], policy: str, view: str) -> int:
    """The most models such that every count up to it reaches the target (0: none)."""
    best = 0
    for point in sorted(points, key=lambda p: p["models"]):
        row = point["policies"].get(policy)
        if row is None or row[view]["value"] < TARGET:
            break
        best = point["models"]
    return best


def ratio(a: int | None, b: int | None) -> float | None:
    return round(a / b, 3) if a and b else None


def paper_study(
    device: DeviceSpec,
    grid: PaperGrid = FULL,
    policies: Sequence[str] = ALL_POLICIES,
    on_run: Callable[[], None] | None = None,
) -> dict:
    """The study's JSON (see the module docstring)."""
    points = []
    for scale in grid.slo_scales:
        slo = Slo(grid.base.ttft_s * scale, grid.base.tbt_s * scale)
        for rate in grid.rates:
            for count in grid.model_counts(rate):
                setting = Setting(count, rate, slo, device, grid.duration(rate), 0, scale)
                points.append(run_point(setting, grid.gpus, policies, on_run))
    head = [p for p in points if p["rate_per_model"] == 0.1 and p["slo_scale"] == 1.0]
    at90 = {pol: {view: models_at_target(head, pol, view) for view in VIEWS} for pol in policies}
    out: dict = {
        "setting": {"device": device.name, "gpus": grid.gpus, "nodes": -(-grid.gpus //
                    GPUS_PER_NODE), "cost_model": f"roofline {device.name}",
                    "model_mix": "60% 7B / 20% 9B / 20% 13B", "arrivals": "Poisson per model",
                    "lengths": "ShareGPT-like lognormal", "attainment_target": TARGET,
                    "policies": list(policies), "views": list(VIEWS)},
        "models_at_90": at90,
        # A policy that passes at the grid's largest count may serve more: its ratio is then
        # a lower bound.
        "models_at_90_grid_max": max(grid.model_counts(0.1)),
    }  # fmt: skip
    aeg = at90.get("aegaeon", {})
    for key, name in BASELINES.items():
        base = at90.get(name)
        out[f"models_at_90_vs_{key}"] = ratio(aeg.get("artifact_qos"), (base or {}).get(
            "artifact_qos"))  # fmt: skip
        out[f"models_at_90_vs_{key}_strict"] = ratio(aeg.get("attainment"), (base or {}).get(
            "attainment"))  # fmt: skip
    out["gpus_needed_at_80"] = headline_gpus(device, grid, policies, on_run)
    needed = out["gpus_needed_at_80"]["policies"]
    aeg_gpus = needed.get("aegaeon", {}).get("gpus")
    dedicated = needed.get("dedicated", {}).get("gpus") or grid.headline_models
    out["gpus_vs_dedicated"] = round(aeg_gpus / dedicated, 4) if aeg_gpus else None
    out["points"] = points
    return out


def headline_gpus(
    device: DeviceSpec, grid: PaperGrid, policies: Sequence[str],
    on_run: Callable[[], None] | None = None,
) -> dict:  # fmt: skip
    """Fewest GPUs per policy at the headline point (strict view), each with its layout;
    dedicated is one GPU per model (checked, not searched)."""
    setting = Setting(grid.headline_models, 0.1, grid.base, device, grid.duration(0.1))
    models, trace = paper_setting_trace(setting)
    cost = roofline_estimator(models, device)
    result = gpus_needed(trace, models, cost, setting, policies, "attainment", on_run)
    return {"models": setting.models, "rate_per_model": 0.1, "slo_scale": 1.0,
            "metric": "attainment", "requests": len(trace), "policies": result}  # fmt: skip


def scaled(grid: PaperGrid, factor: float) -> PaperGrid:
    """The same grid with traces ``factor`` times as long."""
    return replace(grid, duration_s={r: grid.duration(r) * factor for r in grid.rates})
