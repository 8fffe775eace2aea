"""What the baselines share: requests routed to an instance on arrival and served there by
continuous batching of one model per turn. Pure.

Each instance keeps its requests in arrival order. A turn runs one model's requests on the
instance (prefilling the new ones first) for a short quota, so that new arrivals join the batch
at the next turn, as a continuous-batching engine would let them join at the next step. Which
model, and which of its requests, is the subclass's choice (``plan_batch``)::

    instance w0:  queue r1(A) r2(B) r3(A) r4(C)     plan_batch → A (r1, r3)
    turn:         A (r1, r3)  for JOIN_INTERVAL      then plan again
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
    """Base of the baselines: route on arrival, then continuous batching per instance."""

    def __init__(
        self,
        models: dict[str, ModelSpec],
        slo: Slo,
        estimator: StepTimeEstimator | None = None,
    ) -> None:
        super().__init__(models, slo, estimator)
        self.queues: dict[str, list[str]] = {}  # instance → its requests, arrival order
        self.last_used: dict[str, float] = {}  # instance → end of its last turn
        self.quota_s = join_interval(slo)

    def add_instance(self, instance: InstanceView) -> None:
        super().add_instance(instance)
        self.queues.setdefault(instance.instance_id, [])

    def remove_instance(self, instance_id: str) -> list[RequestView]:
        self.queues.pop(instance_id, None)
        self.last_used.pop(instance_id, None)
        return super().remove_instance(instance_id)

    @abstractmethod
    def route(self, request: RequestView, now: float) -> str | Rejection:
        """The instance that will serve ``request``, or why none can."""

    def pick_model(self, instance_id: str) -> str | None:
        """The model an idle instance should run next (it has queued requests of it); used by
        the default ``plan_batch``."""
        raise NotImplementedError

    def plan_batch(self, view: InstanceView, now: float) -> tuple[str, list[str]] | None:
        """The model and the request ids of the next turn. By default the model
        ``pick_model`` names and its requests in arrival order, as many as fit."""
        model = self.pick_model(view.instance_id)
        if model is None:
            return None
        mine = [r for r in self.queues[view.instance_id] if self.requests[r].model == model]
        return model, self.fit(view, mine)

    def submit(self, request: RequestView, now: float) -> Rejection | None:
        if request.model not in self.models:
            return Rejection(f"model {request.model!r} is not registered", status=404)
        where = self.route(request, now)
        if isinstance(where, Rejection):
            return where
        request.instance_id = where
        self.requests[request.request_id] = request
        self._enqueue(where, request)
        return None

    def _enqueue(self, instance_id: str, request: RequestView) -> None:
        """Insert in arrival order (a re-submitted request keeps its place)."""
        queue = self.queues[instance_id]
        at = len(queue)
        while at > 0 and self.requests[queue[at - 1]].arrival > request.arrival:
            at -= 1
        queue.insert(at, request.request_id)

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
        chosen = self.plan_batch(view, now)
        if chosen is None or not chosen[1]:
            return None
        model, ids = chosen
        view.busy = True
        dropped = self.kv_lost_by_switch(view, model)
        return TurnPlan(instance_id, model, ids, quota_s=self.quota_s, drop_kv=dropped)

    def kv_lost_by_switch(self, view: InstanceView, model: str) -> list[str]:
        """Requests whose KV the instance loses when it switches to ``model`` (default: none;
        the engine keeps every request's KV across switches)."""
        return []

    def fit(self, view: InstanceView, request_ids: list[str]) -> list[str]:
        """The longest prefix of ``request_ids`` that fits the KV capacity and MAX_BATCH; a
        request already started (its KV is on the instance) is never left out."""
        ids: list[str] = []
        used = 0
        for request_id in request_ids:
            request = self.requests[request_id]
            need = request.context_len + KV_LOOKAHEAD_TOKENS
            full = used + need > view.kv_capacity_tokens or len(ids) >= MAX_BATCH
            if ids and full and not request.prefilled:
                break
            ids.append(request_id)
            used += need
        return ids

    def kv_room(self, view: InstanceView, request: RequestView) -> bool:
        """Whether ``request`` would fit beside everything queued on the instance."""
        queue = self.queues[view.instance_id]
        need = sum(self.requests[r].context_len + KV_LOOKAHEAD_TOKENS for r in queue)
        need += request.context_len + KV_LOOKAHEAD_TOKENS
        return len(queue) < MAX_BATCH and need <= view.kv_capacity_tokens

    def turn_done(self, instance_id: str, plan: TurnPlan, result: TurnResult, now: float) -> None:
        view = self.instances.get(instance_id)
        if view is not None:
            view.busy = False
            view.resident_model = plan.model
            self.last_used[instance_id] = now
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
