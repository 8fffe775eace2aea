"""The ``static-mux`` baseline: MuxServe, as the best honest version of it in this system.

Models are placed on instances up front by rate and size, and never served anywhere else::

    load(m) = rate(m) × weight_bytes(m)           (work per second ∝ requests × parameters)
    busiest first: onto the instance with the least load placed so far among those whose
    weight budget still holds m; the busiest models land on different instances, and the
    rest fill in beside them, co-resident as memory allows

An instance time-slices among the models of its own set that have work, round-robin, one short
turn each (continuous batching within a turn). A model that fits no instance's remaining budget
has no placement, as in MuxServe (whose placement search ends with "cannot find a placement for
N models" once the models outgrow the devices' memory): its requests are refused (503) and
counted as failures by the benchmarks.

``overflow="swap"`` (``--policy-option overflow=swap``) is a variant beyond MuxServe, for
comparison: such a model goes where it overflows the budget least, and that instance's set then
exceeds its budget: it switches weights in and out among its own members (never outside its set),
paying the switch each time, as ``request-level`` would.

With a locality hint (``Policy.locality``) a model goes, among equally loaded instances, to
one whose node already caches it (its first load, and any move, is then a host → device copy).

Rates: the ``rates`` option (requests/s per model) when the driver knows them; else learned
online from arrival counts (equal at first, so the first placement goes by size). The
placement is recomputed when the arrivals reach REPLACE_PER_MODEL per model, then at each
doubling; a model moves to its new instance only when it has no request queued or running
anywhere, so no running work is stranded; until then it stays where it was.

Kept from MuxServe: rate- and size-aware placement of several models per device, co-residence,
time-slicing among the co-resident set, no weight switching (no placement for what does not fit). Dropped: its spatial sharing of
one device by concurrent kernels (prefill and decode of different models at once, SM
partitioning), its search over GPU meshes and tensor parallelism; every instance here is one
device running one batch at a time.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from aegaeon.scheduler.policies.base import (
    InstanceView,
    ModelSpec,
    Rejection,
    RequestView,
    Slo,
    StepTimeEstimator,
)
from aegaeon.scheduler.policies.serving import ServingPolicy

REPLACE_PER_MODEL = 16
"""Arrivals per model before the first re-placement from learned rates (then at each doubling):
fewer, and counting noise would scatter the models more than their rates differ."""


def place(
    rates: dict[str, float],
    sizes: dict[str, int],
    instances: list[str],
    budgets: dict[str, int],
    overflow: bool = False,
    fetch_s: Callable[[list[str], str], dict[str, float]] | None = None,
) -> dict[str, str]:
    """model → instance: busiest first (rate × size) onto the least-loaded instance that still
    has weight budget for it. One that fits nowhere is left out, or with ``overflow`` goes where
    it overflows the budget least. ``fetch_s(instances, model)``: with a locality hint, the time
    to bring the weights to each instance's node; among equally loaded instances the soonest."""
    left = dict(budgets)
    load = dict.fromkeys(instances, 0.0)
    count = dict.fromkeys(instances, 0)
    owner: dict[str, str] = {}
    work = {m: rates.get(m, 0.0) * sizes[m] for m in sizes}
    for model in sorted(sizes, key=lambda m: (-work[m], -sizes[m], m)):
        fitting = [i for i in instances if left[i] >= sizes[model]]
        if fitting and fetch_s is not None:  # the fetch breaks ties of (load, count) only
            least = min((load[i], count[i]) for i in fitting)
            ties = [i for i in fitting if (load[i], count[i]) == least]
            near = fetch_s(ties, model)
            target = min(ties, key=lambda i: (near[i], -left[i], i))
        elif fitting:
            target = min(fitting, key=lambda i: (load[i], count[i], -left[i], i))
        elif overflow:  # over budget wherever it goes: where it overflows least
            target = min(instances, key=lambda i: (-left[i], load[i], i))
        else:
            continue
        owner[model] = target
        left[target] -= sizes[model]
        load[target] += work[model]
        count[target] += 1
    return owner


class StaticMuxPolicy(ServingPolicy):
    """Rate-aware fixed model sets per instance, time-sliced within the set
    (``--policy static-mux``)."""

    name = "static-mux"

    def __init__(
        self,
        models: dict[str, ModelSpec],
        slo: Slo,
        estimator: StepTimeEstimator | None = None,
        rates: dict[str, float] | None = None,
        overflow: str = "none",
    ) -> None:
        super().__init__(models, slo, estimator)
        if overflow not in ("none", "swap"):
            raise ValueError(f"static-mux overflow must be 'none' or 'swap', not {overflow!r}")
        self.overflow = overflow == "swap"
        self.given_rates = dict(rates) if rates else None
        self.arrivals: Counter[str] = Counter()
        self.owner: dict[str, str] = {}  # where each model is served now
        self.target: dict[str, str] = {}  # where the latest placement wants it
        self.cursor: dict[str, int] = {}
        self.next_replace = REPLACE_PER_MODEL * max(1, len(models))

    def add_instance(self, instance: InstanceView) -> None:
        super().add_instance(instance)
        self.cursor.setdefault(instance.instance_id, 0)
        self._replace(force=True)

    def remove_instance(self, instance_id: str) -> list[RequestView]:
        lost = super().remove_instance(instance_id)
        self.cursor.pop(instance_id, None)
        self._replace(force=True)
        return lost

    def rates(self) -> dict[str, float]:
        """The rates placement uses: given, else arrivals so far (+1 each, equal at start)."""
        if self.given_rates is not None:
            return {m: self.given_rates.get(m, 0.0) for m in self.models}
        return {m: 1.0 + self.arrivals[m] for m in self.models}

    def _replace(self, force: bool = False) -> None:
        """Recompute the placement; models without outstanding requests (or whose instance
        is gone, when ``force``) move now, the others when they drain."""
        ids = list(self.instances)
        sizes = {m: spec.weight_bytes for m, spec in self.models.items()}
        budgets = {i: self.instances[i].weight_budget_bytes for i in ids}
        near = self.fetch_times if self.locality is not None else None
        self.target = place(self.rates(), sizes, ids, budgets, self.overflow, near) if ids else {}
        busy = {r.model for r in self.requests.values()}
        for model, instance_id in self.target.items():
            gone = self.owner.get(model) not in self.instances
            if model not in busy or (force and gone):
                self.owner[model] = instance_id
        for model in set(self.owner) - set(self.target):  # placed out: once it has drained
            if model not in busy or self.owner[model] not in self.instances:
                del self.owner[model]

    def route(self, request: RequestView, now: float) -> str | Rejection:
        self.arrivals[request.model] += 1
        due = self.given_rates is None and sum(self.arrivals.values()) >= self.next_replace
        if due:
            self.next_replace *= 2
        if due or (self.overflow and request.model not in self.target):
            self._replace()
        outstanding = any(r.model == request.model for r in self.requests.values())
        if not outstanding:  # drained: it may move now (or leave, when placed out)
            if request.model in self.target:
                self.owner[request.model] = self.target[request.model]
            else:
                self.owner.pop(request.model, None)
        instance_id = self.owner.get(request.model)
        if instance_id is None and self.instances:
            return Rejection(
                f"static-mux has no placement for {request.model!r}: the instances' weight "
                "budgets hold the other models", status=503, retry_after=1.0,
            )  # fmt: skip
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
