"""The ``request-level`` baseline (ServerlessLLM-like): a model is switched in per request and
stays until its work on that instance is done.

Routing on arrival, in order of preference:
1. an instance where the model is resident or already queued (keep-alive: a warm model serves
   its next requests without a switch);
2. an idle instance with nothing queued (a cold start there);
3. the instance with the fewest requests, FCFS behind them.

An instance runs its current model while any request of it remains, then switches to the model
of its oldest waiting request: one long request holds every other model on that instance.
"""

from __future__ import annotations

from aegaeon.scheduler.policies.base import Rejection, RequestView
from aegaeon.scheduler.policies.serving import ServingPolicy


class RequestLevelPolicy(ServingPolicy):
    """Switch only when the current model's work is done (``--policy request-level``)."""

    name = "request-level"

    def route(self, request: RequestView, now: float) -> str | Rejection:
        if not self.instances:
            return Rejection("no instance is available", status=503, retry_after=1.0)
        for instance_id, view in self.instances.items():
            if view.resident_model == request.model and self._serving(instance_id, request.model):
                return instance_id
        for instance_id in self.instances:
            if request.model in self.models_waiting(instance_id):
                return instance_id
        idle = [i for i, v in self.instances.items() if not self.queues[i] and not v.busy]
        if idle:
            warm = [i for i in idle if self.instances[i].resident_model == request.model]
            return (warm or idle)[0]
        return min(self.instances, key=self.load)

    def _serving(self, instance_id: str, model: str) -> bool:
        """The model is resident there and that instance has no other model waiting first,
        or nothing at all (keep-alive)."""
        waiting = self.models_waiting(instance_id)
        return not waiting or waiting == [model] or waiting[0] == model

    def pick_model(self, instance_id: str) -> str | None:
        waiting = self.models_waiting(instance_id)
        if not waiting:
            return None
        resident = self.instances[instance_id].resident_model
        return resident if resident in waiting else waiting[0]
