"""The ``static-mux`` baseline (MuxServe-like): models are partitioned over instances up front,
several resident per instance as its weight budget allows, and never move.

The partition balances weight bytes (largest model first, onto the instance with the least
assigned). An instance time-slices among the models of its own set that have work, round-robin,
one short turn each; a set larger than the weight budget switches among its own members only.
"""

from __future__ import annotations

from aegaeon.scheduler.policies.base import InstanceView, Rejection, RequestView
from aegaeon.scheduler.policies.serving import ServingPolicy


def partition(
    models: dict[str, int], instances: list[str], budgets: dict[str, int]
) -> dict[str, str]:
    """model → instance. Largest first onto the instance with the most weight budget left
    (ties: fewest models), so each set fits its budget where the budgets allow."""
    left = dict(budgets)
    count = dict.fromkeys(instances, 0)
    owner: dict[str, str] = {}
    for model in sorted(models, key=lambda m: (-models[m], m)):
        target = max(instances, key=lambda i: (left[i], -count[i]))
        owner[model] = target
        left[target] -= models[model]
        count[target] += 1
    return owner


class StaticMuxPolicy(ServingPolicy):
    """Fixed model sets per instance, time-sliced within the set (``--policy static-mux``)."""

    name = "static-mux"

    def add_instance(self, instance: InstanceView) -> None:
        super().add_instance(instance)
        self._repartition()

    def remove_instance(self, instance_id: str) -> list[RequestView]:
        lost = super().remove_instance(instance_id)
        self._repartition()
        return lost

    def _repartition(self) -> None:
        ids = list(self.instances)
        sizes = {m: spec.weight_bytes for m, spec in self.models.items()}
        budgets = {i: self.instances[i].weight_budget_bytes for i in ids}
        self.owner = partition(sizes, ids, budgets) if ids else {}
        self.cursor = dict.fromkeys(ids, 0)

    def route(self, request: RequestView, now: float) -> str | Rejection:
        if request.model not in self.owner:
            self._repartition()  # a model registered after start
        instance_id = self.owner.get(request.model)
        if instance_id is None:
            return Rejection("no instance is available", status=503, retry_after=1.0)
        return instance_id

    def pick_model(self, instance_id: str) -> str | None:
        waiting = self.models_waiting(instance_id)
        if not waiting:
            return None
        rotation = sorted(waiting)
        pick = rotation[self.cursor[instance_id] % len(rotation)]
        self.cursor[instance_id] += 1
        return pick
