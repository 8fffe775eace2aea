"""One simulated run of a policy on a deployment, and the search for the fewest GPUs that keep
≥ 90% SLO attainment (bisection; attainment grows with GPUs), every layout candidate tried at
each count (:mod:`aegaeon.sim.layout`)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from aegaeon.scheduler.estimators import Estimator
from aegaeon.scheduler.policies import POLICIES as REGISTRY
from aegaeon.scheduler.policies import policy_class
from aegaeon.scheduler.policies.base import InstanceView, ModelSpec, Policy, Slo
from aegaeon.sim.device import ENGINE_WEIGHT_SLOTS
from aegaeon.sim.engine import SimResult, simulate
from aegaeon.sim.hardware import DeviceSpec
from aegaeon.sim.layout import Deployment, instance_views, layouts_for, residency
from aegaeon.sim.nodes import Fleet, NodeSetup
from aegaeon.slo_metrics import ATTAINMENT_TARGET
from aegaeon.workload import TraceRequest

__all__ = ["POLICIES", "Deployment", "best_at", "fewest_gpus", "run_deployment",
           "simulate_policy"]  # fmt: skip


class _Registry(Mapping[str, type[Policy]]):
    """The scheduler's policy registry as name → class, each imported when first asked for
    (a policy added to ``aegaeon.scheduler.policies.POLICIES`` is simulated without changes
    here)."""

    def __getitem__(self, name: str) -> type[Policy]:
        if name not in REGISTRY:
            raise KeyError(name)
        return policy_class(name)

    def __iter__(self) -> Iterator[str]:
        return iter(REGISTRY)

    def __len__(self) -> int:
        return len(REGISTRY)


POLICIES: Mapping[str, type[Policy]] = _Registry()


def fresh(cost: Estimator) -> Estimator:
    """The policy's own copy of the cost model: what it learns online (``observe_switch``)
    stays within one run and never changes the simulated truth, which is ``cost``."""
    return copy.deepcopy(cost)


def run_deployment(
    trace: Sequence[TraceRequest],
    policy_name: str,
    deployment: Deployment,
    models: dict[str, ModelSpec],
    device: DeviceSpec,
    cost: Estimator,
    slo: Slo,
    nodes: NodeSetup | None = None,
    stop_below: float | None = None,
) -> SimResult:
    """One simulated run at paper scale: the policy's instances hold what its original system
    would (:func:`aegaeon.sim.layout.residency`). ``nodes``: the GPUs sit on nodes whose host
    caches start warm and fill over the network (:mod:`aegaeon.sim.nodes`); None: every model
    is in every instance's host memory. ``stop_below``: stop once strict attainment cannot reach
    it (:func:`aegaeon.sim.engine.simulate`)."""
    policy = POLICIES[policy_name](dict(models), slo, fresh(cost))
    per_node = nodes.gpus_per_node if nodes else None
    views = instance_views(deployment, device, models, policy_name, per_node)
    fleet = None
    if nodes is not None:
        fleet = Fleet.of(views, {m: s.weight_bytes for m, s in models.items()}, nodes)
    return simulate(trace, policy, views, cost, slo, slots=residency(policy_name), fleet=fleet,
                    stop_below=stop_below)  # fmt: skip


def simulate_policy(
    trace: Sequence[TraceRequest],
    policy_name: str,
    instances: Sequence[InstanceView],
    models: dict[str, ModelSpec],
    cost: Estimator,
    slo: Slo,
) -> SimResult:
    """One run mirroring the live system on instances the caller describes (``bench serve``:
    its real workers' weight budget and KV capacity) priced by ``cost`` (e.g. the fitted CPU
    profile). Every live worker has the engine's 2 weight slots, whatever the policy, so
    residency is by those slots here."""
    policy = POLICIES[policy_name](dict(models), slo, fresh(cost))
    views = [InstanceView(v.instance_id, v.role, v.kv_capacity_tokens, v.weight_budget_bytes)
             for v in instances]  # fmt: skip
    return simulate(trace, policy, views, cost, slo, slots=ENGINE_WEIGHT_SLOTS)


Metric = str  # "attainment" (per request) or "time_fraction_attainment"


def best_at(
    gpus: int, policy_name: str, run: Callable[[Deployment], SimResult], metric: Metric
) -> tuple[Deployment, SimResult]:
    """The best of the layouts offered at ``gpus`` (as the policy runs them); stops at the
    first that reaches the target."""
    best: tuple[Deployment, SimResult] | None = None
    for deployment in layouts_for(policy_name, gpus):
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
