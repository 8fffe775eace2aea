"""The ``dedicated`` baseline: one model per instance, never a switch.

Models are bound to instances as instances join, in registration order. With a locality hint
they are bound at the first request instead, once the instances have joined, each to a free
instance whose node caches it when there is one. It needs as many instances as models; a
request for a model with no instance of its own is rejected (503), so the shortfall is visible
rather than hidden in a queue.
"""

from __future__ import annotations

from aegaeon.scheduler.policies.base import InstanceView, Rejection, RequestView
from aegaeon.scheduler.policies.serving import ServingPolicy


class DedicatedPolicy(ServingPolicy):
    """One model per instance (``--policy dedicated``)."""

    name = "dedicated"

    def add_instance(self, instance: InstanceView) -> None:
        super().add_instance(instance)
        if self.locality is None:  # with a hint: at the next request, to choose among them all
            self._bind()

    def remove_instance(self, instance_id: str) -> list[RequestView]:
        lost = super().remove_instance(instance_id)
        self._bind()
        return lost

    def _bind(self) -> None:
        """Give every unbound model a free instance (a model keeps its instance while it lives)."""
        self.owner: dict[str, str] = {
            m: i for m, i in getattr(self, "owner", {}).items() if i in self.instances
        }
        taken = set(self.owner.values())
        free = [i for i in self.instances if i not in taken]
        for model in self.models:
            if model not in self.owner and free:
                pick = 0
                if self.locality is not None:
                    near = self.fetch_times(free, model)
                    pick = min(range(len(free)), key=lambda k: near[free[k]])
                self.owner[model] = free.pop(pick)

    def route(self, request: RequestView, now: float) -> str | Rejection:
        self._bind()  # models may have been added since
        instance_id = self.owner.get(request.model)
        if instance_id is None:
            return Rejection(
                f"dedicated: no instance of its own for model {request.model!r} "
                f"({len(self.instances)} instances for {len(self.models)} models)",
                status=503,
            )
        return instance_id

    def pick_model(self, instance_id: str) -> str | None:
        waiting = self.models_waiting(instance_id)
        return waiting[0] if waiting else None
