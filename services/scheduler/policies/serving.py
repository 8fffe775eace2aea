"""What the three baselines share: requests routed to an instance on arrival and served there
by continuous batching of one model per turn. Pure.

Each instance keeps its requests in arrival order (FCFS). A turn takes the model the subclass
picks and runs that model's requests on the instance (prefilling the new ones first), for a
short quota so that new arrivals join the batch at the next turn, as a continuous-batching
engine would let them join at the next step::

    instance w0:  queue r1(A) r2(B) r3(A) r4(C)     pick_model → A
    turn:         A (r1, r3)  for JOIN_INTERVAL      then pick again
"""

from __future__ import annotations

from abc import abstractmethod

from aegaeon.scheduler.policies.base import (
    InstanceView,
    ModelSpec,
    Policy,
    Rejection,
    RequestView,
    Slo,
    StepTimeEstimator,
    TurnPlan,
    TurnResult,
)

MAX_BATCH = 256
KV_LOOKAHEAD_TOKENS = 48  # same growth room per request as aegaeon's packing


def join_interval(slo: Slo) -> float:
    """Turn length of the baselines: short against the TTFT target (new requests wait at most
    one turn to join), long against a step."""
    return max(0.05, min(1.0, slo.ttft_s / 10))


class ServingPolicy(Policy):
    """Base of the baselines: route on arrival, then FCFS continuous batching per instance."""

    def __init__(
        self,
        models: dict[str, ModelSpec],
        slo: Slo,
        estimator: StepTimeEstimator | None = None,
    ) -> None:
        super().__init__(models, slo, estimator)
        self.queues: dict[str, list[str]] = {}  # instance → its requests, arrival order
        self.quota_s = join_interval(slo)

    def add_instance(self, instance: InstanceView) -> None:
        super().add_instance(instance)
        self.queues.setdefault(instance.instance_id, [])

    def remove_instance(self, instance_id: str) -> list[RequestView]:
        self.queues.pop(instance_id, None)
        return super().remove_instance(instance_id)

    @abstractmethod
    def route(self, request: RequestView, now: float) -> str | Rejection:
        """The instance that will serve ``request``, or why none can."""

    @abstractmethod
    def pick_model(self, instance_id: str) -> str | None:
        """The model an idle instance should run next (it has queued requests of it)."""

    def submit(self, request: RequestView, now: float) -> Rejection | None:
        if request.model not in self.models:
            return Rejection(f"model {request.model!r} is not registered", status=404)
        where = self.route(request, now)
        if isinstance(where, Rejection):
            return where
        request.instance_id = where
        self.requests[request.request_id] = request
        self.queues[where].append(request.request_id)
        return None

    def models_waiting(self, instance_id: str) -> list[str]:
        """Models with requests on this instance, in order of their oldest request."""
        seen: dict[str, None] = {}
        for request_id in self.queues[instance_id]:
            seen.setdefault(self.requests[request_id].model, None)
        return list(seen)

    def next_turn(self, instance_id: str, now: float) -> TurnPlan | None:
        view = self.instances.get(instance_id)
        if view is None or view.busy or not self.queues.get(instance_id):
            return None
        model = self.pick_model(instance_id)
        if model is None:
            return None
        ids = self._batch(view, model)
        view.busy = True
        return TurnPlan(instance_id, model, ids, quota_s=self.quota_s)

    def _batch(self, view: InstanceView, model: str) -> list[str]:
        """This model's requests in arrival order, as many as fit the KV capacity."""
        ids: list[str] = []
        used = 0
        for request_id in self.queues[view.instance_id]:
            request = self.requests[request_id]
            if request.model != model:
                continue
            need = request.context_len + KV_LOOKAHEAD_TOKENS
            if ids and (used + need > view.kv_capacity_tokens or len(ids) >= MAX_BATCH):
                break
            ids.append(request_id)
            used += need
        return ids

    def turn_done(self, instance_id: str, plan: TurnPlan, result: TurnResult, now: float) -> None:
        view = self.instances.get(instance_id)
        if view is not None:
            view.busy = False
            view.resident_model = plan.model
        for request_id in plan.request_ids:
            request = self.requests.get(request_id)
            if request is None:
                continue
            request.generated = result.generated.get(request_id, request.generated)
            request.prefilled = request.prefilled or request.generated > 0
        for request_id in result.finished:
            self.cancel(request_id)

    def cancel(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        if request is not None and request.instance_id in self.queues:
            queue = self.queues[request.instance_id]
            if request_id in queue:
                queue.remove(request_id)

    def load(self, instance_id: str) -> int:
        """Requests on an instance (the routing tie-breaker)."""
        return len(self.queues[instance_id])
