"""The ``request-level`` baseline: ServerlessLLM, as the best honest version of it.

Routing on arrival, in order of preference:

1. an instance where the model is warm and that can take the request now: it is serving that
   model, nothing of another model waits there, and the batch has room (keep-alive: a warm
   model serves its next requests without a switch);
2. an idle instance (nothing queued, no turn running): scale-out, a cold start there; one that
   holds no model, else the least recently used;
3. else it queues: on an instance where its model already waits (it will share that batch),
   else on the one with the fewest requests.

With a locality hint (``Policy.locality``), as ServerlessLLM's locality-aware allocation
picks the server that starts the model soonest: a scale-out goes to the idle instance whose
node brings the weights soonest (a node caching them first), then as above; a request that
queues goes, among the least loaded, where the weights are soonest.

Each instance serves its queue **FCFS by arrival** (within a priority class: a higher class's
oldest request goes first, and a request waiting past the maximum wait before every class; see
:meth:`Policy.ranks`). When the model it serves has no admissible
request left, it switches to the model of the oldest request waiting on it, whatever its model,
and a *period* of that model begins. A period admits, by continuous batching: every request of
the model that waited when the period began, and a later arrival of the model only while no
request of another model has been waiting since before it arrived. So an older request of model
B goes before newer arrivals of the resident model A, while A's arrivals still join its running
batch as long as nothing older waits::

    w0 serving A:  a0(run)  b0  a1        a1 arrived after b0: it waits
    a0 ends:       B period: b0 (+ every B waiting now)   then A: a1

A model stays resident until another is needed (keep-alive), and a request is never preempted
once started: ServerlessLLM runs each request to completion on its instance. Requests whose KV
the engine has to evict are recomputed by the worker at their next step (prefill of prompt +
tokens so far); ServerlessLLM has no KV swap, so this policy never asks for one. A switch to
another model unloads the old one with its KV (``kv_lost_by_switch``): a started request of
another model on the instance (only ``sllm-plus`` preempts, so only there) is recomputed.

Kept from ServerlessLLM: warm routing, scale-out onto idle instances with a cold start,
per-request FCFS queues, keep-alive, recompute on eviction. Dropped: its multi-tier checkpoint
loading and live migration (switches here cost what the engine's switch costs for every policy),
and its per-model instance concurrency limit (a batch takes what fits the KV capacity).
"""

from __future__ import annotations

from aegaeon.scheduler.policies.base import (
    InstanceView,
    ModelSpec,
    Rejection,
    RequestView,
    Slo,
    StepTimeEstimator,
)
from aegaeon.scheduler.policies.serving import ServingPolicy


class RequestLevelPolicy(ServingPolicy):
    """ServerlessLLM: warm routing, scale-out, FCFS by arrival per instance
    (``--policy request-level``)."""

    name = "request-level"

    def __init__(
        self,
        models: dict[str, ModelSpec],
        slo: Slo,
        estimator: StepTimeEstimator | None = None,
    ) -> None:
        super().__init__(models, slo, estimator)
        # instance → (model served, arrival of the newest request of it waiting when its
        # period began). Arrival stamps, not ``now``: drivers may keep them on another clock.
        self.period: dict[str, tuple[str, float]] = {}

    def remove_instance(self, instance_id: str) -> list[RequestView]:
        self.period.pop(instance_id, None)
        return super().remove_instance(instance_id)

    # ------------------------------------------------------------ routing

    def route(self, request: RequestView, now: float) -> str | Rejection:
        if not self.instances:
            return Rejection("no instance is available", status=503, retry_after=1.0)
        warm = [i for i, v in self.instances.items() if self.can_take(v, request)]
        if warm:
            return min(warm, key=self.load)
        idle = [i for i, v in self.instances.items() if not self.queues[i] and not v.busy]
        if self.locality is not None:
            return self._route_near(idle, request.model)
        if idle:
            return min(idle, key=self._eviction_order)
        waiting = [i for i in self.instances if self._waits(i, request.model)]
        return min(waiting or self.instances, key=self.load)

    def _waits(self, instance_id: str, model: str) -> bool:
        """A request of ``model`` waits on the instance."""
        return any(self.requests[r].model == model for r in self.queues[instance_id])

    def _route_near(self, idle: list[str], model: str) -> str:
        """Routes 2 and 3 with the time to bring the weights to each node weighed in: the
        soonest node first among idle instances, among the least loaded ones else."""
        if idle:
            near = self.fetch_times(idle, model)
            return min(idle, key=lambda i: (near[i], *self._eviction_order(i)))
        pool = [i for i in self.instances if self._waits(i, model)] or list(self.instances)
        least = min(self.load(i) for i in pool)
        pool = [i for i in pool if self.load(i) == least]
        return min(pool, key=self.fetch_times(pool, model).__getitem__)

    def serving(self, view: InstanceView) -> str | None:
        """The model the instance serves now (its period's, else the resident one)."""
        period = self.period.get(view.instance_id)
        return period[0] if period else view.resident_model

    def can_take(self, view: InstanceView, request: RequestView) -> bool:
        """Warm for the request's model, nothing else waits there, and the batch has room."""
        queue = self.queues[view.instance_id]
        return (
            self.serving(view) == request.model
            and all(self.requests[r].model == request.model for r in queue)
            and self.kv_room(view, request)
        )

    def _eviction_order(self, instance_id: str) -> tuple[bool, float]:
        """Cold start on an empty instance first, else on the least recently used one."""
        view = self.instances[instance_id]
        return view.resident_model is not None, self.last_used.get(instance_id, float("-inf"))

    def kv_lost_by_switch(self, view: InstanceView, model: str) -> list[str]:
        """A ServerlessLLM instance that loads another model unloads the old one with its vLLM
        engine, KV cache included: the started requests of other models on it are recomputed
        when they run again (prefill of prompt + tokens so far)."""
        if view.resident_model is None or model == view.resident_model:
            return []
        lost = [r for r in self.queues[view.instance_id]
                if self.requests[r].model != model and self.requests[r].prefilled]  # fmt: skip
        for request_id in lost:
            self.requests[request_id].prefilled = False
        return lost

    # ------------------------------------------------------------ FCFS by arrival

    def plan_batch(self, view: InstanceView, now: float) -> tuple[str, list[str]] | None:
        queue = self.queues[view.instance_id]
        if not queue:
            return None
        period = self.period.get(view.instance_id)
        admitted = self.admissible(view.instance_id, period, now) if period else []
        if period is None or not admitted:
            ranks = self.ranks(queue, now)  # one class throughout: the oldest request's model
            head = min(range(len(queue)), key=lambda i: (ranks[queue[i]], i))
            model = self.requests[queue[head]].model
            waited = max(self.requests[r].arrival for r in queue if self.requests[r].model == model)
            period = (model, waited)
            self.period[view.instance_id] = period
            admitted = self.admissible(view.instance_id, period, now)
        started = [r for r in admitted if self.requests[r].prefilled]
        fresh = [r for r in admitted if not self.requests[r].prefilled]
        return period[0], self.fit(view, started + fresh)

    def admissible(self, instance_id: str, period: tuple[str, float], now: float) -> list[str]:
        """The period model's requests on the instance that may run now, in arrival order:
        started ones, those waiting when the period began, and later ones that arrived
        before the oldest request of another model still waiting (of another model whose
        rank is as high as the period's: a lower class waits for the higher's arrivals, until
        it is starving)."""
        model, waited = period
        queue = self.queues[instance_id]
        mine = self.class_rank(model)
        ranks = self.ranks(queue, now)
        other = min(
            (self.requests[r].arrival for r in queue
             if self.requests[r].model != model and ranks[r] <= mine),
            default=float("inf"),
        )  # fmt: skip
        out = []
        for request_id in queue:
            request = self.requests[request_id]
            if request.model == model and (
                request.prefilled or request.arrival <= waited or request.arrival < other
            ):
                out.append(request_id)
        return out
