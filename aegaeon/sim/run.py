"""Simulated deployments: build instances for a policy on N GPUs, run a trace, and search for the
fewest GPUs that keep ≥ 90% SLO attainment (bisection; attainment grows with GPUs)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from aegaeon.scheduler.estimators import Estimator
from aegaeon.scheduler.policies.aegaeon import AegaeonPolicy
from aegaeon.scheduler.policies.base import InstanceRole, InstanceView, ModelSpec, Policy, Slo
from aegaeon.scheduler.policies.dedicated import DedicatedPolicy
from aegaeon.scheduler.policies.request_level import RequestLevelPolicy
from aegaeon.scheduler.policies.static_mux import StaticMuxPolicy
from aegaeon.sim.engine import SimResult, simulate
from aegaeon.sim.hardware import DeviceSpec
from aegaeon.slo_metrics import ATTAINMENT_TARGET
from aegaeon.workload import TraceRequest

POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (AegaeonPolicy, RequestLevelPolicy, StaticMuxPolicy, DedicatedPolicy)
}
PREFILL_SHARES = (0.12, 0.18, 0.25)  # of the GPUs, tried as aegaeon's prefill instances
KV_RESERVE_FRACTION = 0.2  # of device memory kept for KV; the rest may hold weights
USABLE_MEMORY = 0.9
AEGAEON_SLOTS: int | None = 2


@dataclass(frozen=True)
class Deployment:
    """How many GPUs, and for aegaeon how many of them are prefill instances (0: all "both")."""

    gpus: int
    prefill: int = 0


def weight_budget(policy_name: str, device: DeviceSpec, models: dict[str, ModelSpec]) -> int:
    """Device memory a policy gives to weights (the rest holds KV).

    static-mux keeps as many models resident as fit beside a KV reserve (that is MuxServe's
    idea); aegaeon's worker holds the resident model and the one being prefetched
    (DESIGN.md §5); request-level and dedicated hold one model.
    """
    usable = device.memory_bytes * USABLE_MEMORY
    biggest = max(m.weight_bytes for m in models.values())
    slots = {"aegaeon": AEGAEON_SLOTS, "request-level": 1, "dedicated": 1}.get(policy_name)
    if slots is None:
        return int(usable * (1 - KV_RESERVE_FRACTION))
    return min(int(usable * (1 - KV_RESERVE_FRACTION)), slots * biggest)


def instance_views(
    deployment: Deployment, device: DeviceSpec, models: dict[str, ModelSpec],
    policy_name: str = "static-mux",
) -> list[InstanceView]:  # fmt: skip
    """The instances of a deployment; every GPU gets the same memory split."""
    usable = device.memory_bytes * USABLE_MEMORY
    weights = weight_budget(policy_name, device, models)
    biggest_kv = max(m.kv_bytes_per_token for m in models.values())
    views = []
    for i in range(deployment.gpus):
        role: InstanceRole = "both"
        if deployment.prefill:
            role = "prefill" if i < deployment.prefill else "decode"
        views.append(
            InstanceView(
                f"g{i:03d}",
                role=role,
                kv_capacity_tokens=int((usable - weights) // biggest_kv),
                weight_budget_bytes=weights,
            )
        )
    return views


def run_deployment(
    trace: Sequence[TraceRequest],
    policy_name: str,
    deployment: Deployment,
    models: dict[str, ModelSpec],
    device: DeviceSpec,
    cost: Estimator,
    slo: Slo,
) -> SimResult:
    """One simulated run."""
    policy = POLICIES[policy_name](dict(models), slo, cost)
    views = instance_views(deployment, device, models, policy_name)
    return simulate(trace, policy, views, cost, slo)


def simulate_policy(
    trace: Sequence[TraceRequest],
    policy_name: str,
    instances: Sequence[InstanceView],
    models: dict[str, ModelSpec],
    cost: Estimator,
    slo: Slo,
) -> SimResult:
    """One run on instances the caller describes (``bench serve`` mirrors its real workers:
    their weight budget and KV capacity) priced by ``cost`` (e.g. the fitted CPU profile)."""
    policy = POLICIES[policy_name](dict(models), slo, cost)
    views = [InstanceView(v.instance_id, v.role, v.kv_capacity_tokens, v.weight_budget_bytes)
             for v in instances]  # fmt: skip
    return simulate(trace, policy, views, cost, slo)


def deployments_for(policy_name: str, gpus: int) -> list[Deployment]:
    """The layouts tried at a GPU count. Aegaeon disaggregates: a few prefill instances (their
    work is mostly switching in each group's model), the rest decode; or every GPU doing both."""
    if policy_name != "aegaeon" or gpus < 2:
        return [Deployment(gpus)]
    shares = sorted({max(1, min(gpus - 1, round(gpus * f))) for f in PREFILL_SHARES})
    return [Deployment(gpus), *(Deployment(gpus, p) for p in shares)]


Metric = str  # "attainment" (per request) or "time_fraction_attainment"


def best_at(
    gpus: int, policy_name: str, run: Callable[[Deployment], SimResult], metric: Metric
) -> tuple[Deployment, SimResult]:
    """The best layout at ``gpus``; stops at the first that reaches the target."""
    best: tuple[Deployment, SimResult] | None = None
    for deployment in deployments_for(policy_name, gpus):
        result = run(deployment)
        if best is None or result.metrics[metric] > best[1].metrics[metric]:
            best = (deployment, result)
        if result.metrics[metric] >= ATTAINMENT_TARGET:
            break
    assert best is not None
    return best


@dataclass
class Needed:
    """The answer of a GPU search: the fewest GPUs (None: even ``high`` missed the target),
    the layout and the run there (at ``high`` when it missed)."""

    gpus: int | None
    deployment: Deployment
    result: SimResult
    runs: int


def fewest_gpus(
    policy_name: str,
    run: Callable[[Deployment], SimResult],
    low: int,
    high: int,
    *,
    guess: int | None = None,
    metric: Metric = "attainment",
) -> Needed:
    """Bisection for the fewest GPUs in [low, high] reaching the target, probing ``guess``
    first (a good guess halves the runs)."""
    cache: dict[int, tuple[Deployment, SimResult]] = {}

    def ok(g: int) -> bool:
        if g not in cache:
            cache[g] = best_at(g, policy_name, run, metric)
        return cache[g][1].metrics[metric] >= ATTAINMENT_TARGET

    lo, hi = low, high
    probe = min(max(guess, low), high) if guess else None
    while lo < hi:
        mid = probe if probe is not None else (lo + hi) // 2
        probe = None
        if ok(mid):
            hi = mid
        else:
            lo = mid + 1
    passed = ok(hi)
    return Needed(hi if passed else None, cache[hi][0], cache[hi][1], len(cache))
