"""Aegaeon's token-level policy: grouped prefill (Algorithm 1) and weighted round-robin decode
with SLO-derived quotas (Algorithm 2), as DESIGN.md §6 states them.

The parts, one file each: :mod:`.grouped_prefill` (where a request is prefilled, the prefill
turn), :mod:`.decode_rounds` (where it decodes, the quota of each decode turn),
:mod:`.prefetch` (which model each turn stages for the next), over the books of
:mod:`.aegaeon_lanes`. This module joins them and answers the driver.

After a prefill on a prefill instance, ``TurnPlan.handoff`` names the decode instance each
request's KV goes to (through the host KV pool): the one already decoding that model while its
α stays ≤ 1, else the one with the lowest α.

An instance of role "both" does both. A request whose model it is already decoding rides along
in that batch's next turn (no switch of its own); other requests form groups. Groups and batches
are taken earliest deadline first.

A model with ``ModelSpec.pin = N`` is pinned on N instances: they keep its weights in a slot
(``TurnPlan.pinned``; the worker never evicts it) and its requests are prefilled and decoded
there (:meth:`~.aegaeon_lanes.AegaeonBase._assign_pins`).
"""

from __future__ import annotations

from collections import deque

from aegaeon.scheduler.policies.aegaeon_lanes import GROUP_CAP, Lane, switch_slots
from aegaeon.scheduler.policies.base import (
    InstanceView,
    ModelSpec,
    Rejection,
    RequestView,
    TurnPlan,
    TurnResult,
)
from aegaeon.scheduler.policies.decode_rounds import DecodeRounds
from aegaeon.scheduler.policies.grouped_prefill import GroupedPrefill
from aegaeon.scheduler.policies.prefetch import PrefetchChoice

__all__ = ["GROUP_CAP", "AegaeonPolicy"]


class AegaeonPolicy(GroupedPrefill, DecodeRounds, PrefetchChoice):
    """Grouped prefill + weighted round-robin decode with SLO quotas (``--policy aegaeon``)."""

    name = "aegaeon"

    # ------------------------------------------------------------ membership

    def add_model(self, spec: ModelSpec) -> None:
        super().add_model(spec)
        self._assign_pins()

    def remove_model(self, name: str) -> None:
        super().remove_model(name)
        self.weights_evicted(name)
        self._assign_pins()  # its instances no longer keep it

    def weights_evicted(self, name: str) -> None:
        super().weights_evicted(name)
        self.demand.forget(name)  # not staged again until it is asked for again
        for lane in self.lanes.values():
            if lane.standby == name:
                lane.standby = None

    def add_instance(self, instance: InstanceView) -> None:
        super().add_instance(instance)
        self.lanes[instance.instance_id] = Lane()
        self._assign_pins()
        pending, self.unplaced = self.unplaced, deque()
        for request_id in pending:
            request = self.requests.get(request_id)
            if request is not None and request.prefilled:
                self._after_prefill(request, None)
            elif request is not None and not self._place_for_prefill(request, 0.0):
                self.unplaced.append(request_id)

    def remove_instance(self, instance_id: str) -> list[RequestView]:
        self.lanes.pop(instance_id, None)
        lost = super().remove_instance(instance_id)
        self._assign_pins()
        return lost

    def submit(self, request: RequestView, now: float) -> Rejection | None:
        if request.model not in self.models:
            return Rejection(f"model {request.model!r} is not registered", status=404)
        self.requests[request.request_id] = request
        self.demand.arrived(request.model, now)
        if not self._place_for_prefill(request, now):
            self.unplaced.append(request.request_id)
        return None

    # ------------------------------------------------------------ driver calls

    def next_turn(self, instance_id: str, now: float) -> TurnPlan | None:
        view, lane = self.instances.get(instance_id), self.lanes.get(instance_id)
        if view is None or lane is None or view.busy:
            return None
        if lane.groups:
            self._order_groups(lane, now)  # a group may have waited past the maximum wait
        if view.role == "prefill":
            return self._prefill_turn(instance_id, now)
        if view.role == "decode":
            return self._decode_turn(instance_id, now)
        if lane.groups and self._prefill_first(lane):
            return self._prefill_turn(instance_id, now) or self._decode_turn(instance_id, now)
        return self._decode_turn(instance_id, now) or self._prefill_turn(instance_id, now)

    def _prefill_first(self, lane: Lane) -> bool:
        """On a "both" instance: the group's first tokens are due before the most urgent
        batch's next token (earliest deadline first), or no batch waits."""
        self._drop_empty_batches(lane)
        if not lane.batches:
            return True
        return self._group_due(lane.groups[0]) <= min(self._deadline(b) for b in lane.batches)

    def turn_done(self, instance_id: str, plan: TurnPlan, result: TurnResult, now: float) -> None:
        view = self.instances.get(instance_id)
        if view is not None:
            lane = self.lanes[instance_id]
            lane.standby = _standby_after(plan, view.resident_model, lane)
            view.busy = False
            view.resident_model = plan.model
            lane.busy_until, lane.running, lane.staged = now, None, None
            lane.stage_when_idle = True
        finished = set(result.finished)
        for request_id in plan.request_ids:
            request = self.requests.get(request_id)
            if request is None:
                continue
            request.generated = result.generated.get(request_id, request.generated)
            request.prefilled = request.prefilled or request.generated > 0
            if request_id in finished:
                del self.requests[request_id]
                continue
            if plan.prefill_only:
                request.prefilled = True
                request.generated = max(request.generated, 1)
                self._after_prefill(request, plan.handoff.get(request_id, instance_id))

    def _after_prefill(self, request: RequestView, target: str | None) -> None:
        if target not in self.lanes or self.instances[target].role == "prefill":
            target = self._choose_decode_instance(request)
        if target is None:  # no decode instance at all: keep it where it is, retry later
            self.unplaced.append(request.request_id)
            return
        self._place_for_decode(request, target)

    def cancel(self, request_id: str) -> None:
        self.requests.pop(request_id, None)
        if request_id in self.unplaced:  # waits for an instance that may never come
            self.unplaced.remove(request_id)


def _standby_after(plan: TurnPlan, before: str | None, lane: Lane) -> str | None:
    """The model in the instance's other weight slot after ``plan``'s turn: the pinned model,
    which holds it for good; else the one staged during the turn (its copy goes on after the
    turn); else as the switch left the slots (:func:`switch_slots`)."""
    if plan.pinned is not None and plan.pinned != plan.model:
        return plan.pinned
    if lane.staged is not None and lane.staged != plan.model:
        return lane.staged
    _, standby = switch_slots(before, lane.standby, plan.model, None)
    return standby if standby != plan.model else None
