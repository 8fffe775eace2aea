"""A simple token-level policy: plain round-robin over the models that have work.

Each request goes, when it arrives, to the least-loaded instance and stays there. An idle
instance runs one turn for the next model (in rotation) that has requests on it, with a
bounded batch of that model's requests, for a fixed time quota::

    instance w0:  [A: r1 r4] [B: r2] [C: r3 r5]       queues per model, FIFO
    turns:         A(r1,r4) → B(r2) → C(r3,r5) → A(…)  one quota each, KV swapped out between

No SLO arithmetic (that is ``aegaeon``'s weighted round-robin): every model gets the same
quota. It is the smallest policy that exercises token-level switching end to end.
"""

from __future__ import annotations

from collections import defaultdict

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

KV_LOOKAHEAD_TOKENS = 16
"""Room kept per request when packing a batch, so it can decode a while before it grows out."""


class RoundRobinPolicy(Policy):
    """Token-level round-robin over models, one fixed quota per turn (``--policy round-robin``)."""

    name = "round-robin"

    def __init__(
        self,
        models: dict[str, ModelSpec],
        slo: Slo,
        estimator: StepTimeEstimator | None = None,
        quota_s: float = 0.5,
        max_batch: int = 16,
    ) -> None:
        super().__init__(models, slo, estimator)
        if quota_s <= 0 or max_batch < 1:
            raise ValueError("quota_s must be > 0 and max_batch ≥ 1")
        self.quota_s = quota_s
        self.max_batch = max_batch
        # instance → model → request ids in arrival order; dicts keep the models' rotation order.
        self._queues: dict[str, dict[str, list[str]]] = defaultdict(dict)
        self._last_model: dict[str, str] = {}
        self._running: dict[str, TurnPlan] = {}

    # ------------------------------------------------------------------ admission

    def submit(self, request: RequestView, now: float) -> Rejection | None:
        if request.model not in self.models:
            return Rejection(f"unknown model {request.model!r}", status=404)
        instance = self._least_loaded(request.model)
        if instance is None:
            return Rejection("no worker available", status=503, retry_after=1.0)
        request.instance_id = instance.instance_id
        self.requests[request.request_id] = request
        self._queues[instance.instance_id].setdefault(request.model, []).append(request.request_id)
        return None

    def _least_loaded(self, model: str) -> InstanceView | None:
        """Fewest requests held; instances that can decode ("both") first, ids break ties
        (after, with a locality hint, the time to bring the model's weights to the node)."""
        candidates = [i for i in self.instances.values() if i.role == "both"]
        candidates = candidates or list(self.instances.values())
        if not candidates:
            return None
        if self.locality is not None:
            return min(candidates, key=lambda i: (self._load(i.instance_id),
                       self.fetch_s(i.instance_id, model), i.instance_id))  # fmt: skip
        return min(candidates, key=lambda i: (self._load(i.instance_id), i.instance_id))

    def _load(self, instance_id: str) -> int:
        return sum(len(ids) for ids in self._queues.get(instance_id, {}).values())

    # ------------------------------------------------------------------ turns

    def next_turn(self, instance_id: str, now: float) -> TurnPlan | None:
        instance = self.instances.get(instance_id)
        if instance is None or instance_id in self._running:
            return None
        waiting = self._models_with_work(instance_id)
        if not waiting:
            return None
        model = self._pick_model(instance, waiting)
        others = [m for m in waiting if m != model]
        plan = TurnPlan(
            instance_id=instance_id,
            model=model,
            request_ids=self._batch(instance, model),
            quota_s=self.quota_s,
            swap_out_after=bool(others),
            prefetch_model=self._after(instance_id, model, waiting) if others else None,
        )
        self._running[instance_id] = plan
        instance.busy = True
        return plan

    def _models_with_work(self, instance_id: str) -> list[str]:
        return [m for m, ids in self._queues.get(instance_id, {}).items() if ids]

    def _pick_model(self, instance: InstanceView, waiting: list[str]) -> str:
        """The model after the last one served; at the start the resident one (no switch)."""
        last = self._last_model.get(instance.instance_id)
        if last is None:
            return instance.resident_model if instance.resident_model in waiting else waiting[0]
        return self._after(instance.instance_id, last, waiting)

    def _after(self, instance_id: str, model: str, waiting: list[str]) -> str:
        """The next model in rotation order after ``model`` among those waiting."""
        order = list(self._queues[instance_id].keys())
        start = order.index(model) + 1 if model in order else 0
        for candidate in order[start:] + order[:start]:
            if candidate in waiting:
                return candidate
        return waiting[0]

    def _batch(self, instance: InstanceView, model: str) -> list[str]:
        """Oldest requests first, at most ``max_batch``, as many as the KV capacity holds."""
        batch: list[str] = []
        tokens = 0
        for request_id in self._queues[instance.instance_id][model]:
            need = self.requests[request_id].context_len + KV_LOOKAHEAD_TOKENS
            if batch and (
                len(batch) >= self.max_batch or tokens + need > instance.kv_capacity_tokens
            ):
                break
            batch.append(request_id)
            tokens += need
        return batch

    def turn_done(self, instance_id: str, plan: TurnPlan, result: TurnResult, now: float) -> None:
        self._running.pop(instance_id, None)
        instance = self.instances.get(instance_id)
        if instance is not None:
            instance.busy = False
            instance.resident_model = plan.model
        self._last_model[instance_id] = plan.model
        self._rotate_to_back(instance_id, plan)
        for request_id, generated in result.generated.items():
            request = self.requests.get(request_id)
            if request is not None:
                request.generated = generated
                request.prefilled = request.prefilled or generated > 0
        for request_id in result.finished:
            self.cancel(request_id)

    def _rotate_to_back(self, instance_id: str, plan: TurnPlan) -> None:
        """Requests that just ran go behind those of their model that did not (fairness when
        a model has more requests than one batch holds)."""
        queue = self._queues.get(instance_id, {}).get(plan.model)
        if not queue:
            return
        ran = set(plan.request_ids)
        queue[:] = [r for r in queue if r not in ran] + [r for r in queue if r in ran]

    # ------------------------------------------------------------------ leaving

    def cancel(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        if request is None or request.instance_id is None:
            return
        queue = self._queues.get(request.instance_id, {}).get(request.model)
        if queue and request_id in queue:
            queue.remove(request_id)

    def remove_instance(self, instance_id: str) -> list[RequestView]:
        lost = super().remove_instance(instance_id)
        self._queues.pop(instance_id, None)
        self._running.pop(instance_id, None)
        self._last_model.pop(instance_id, None)
        for request in lost:
            request.instance_id = None
            request.prefilled = False
        return lost
