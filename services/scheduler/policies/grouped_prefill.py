"""Aegaeon's grouped prefill (DESIGN.md §6, Algorithm 1). Pure.

Prefill instances hold queues of *groups* (one model, ≤ GROUP_CAP requests)::

    prefill p0:  [A: r1 r4 r7] → [B: r2] → [A: r9]     a new A request joins a queued A group
                  ^ running     ^ prefetched           with room, else a new group goes to the
                                                       instance that would finish it first

A turn prefills one group after one switch (its first tokens), and on a prefill instance
``TurnPlan.handoff`` names the decode instance each request's KV goes to. On a "both"
instance already decoding the request's model, the request instead rides along in that batch's
next turn (the worker prefills new members first): no switch of its own.
"""

from __future__ import annotations

from aegaeon.scheduler.policies.aegaeon_lanes import GROUP_CAP, AegaeonBase, PrefillGroup
from aegaeon.scheduler.policies.base import RequestView, TurnPlan


class GroupedPrefill(AegaeonBase):
    """Algorithm 1: where a request is prefilled, and the prefill turn."""

    def _prefill_lanes(self) -> list[str]:
        return [i for i, v in self.instances.items() if v.role in ("prefill", "both")]

    def _place_for_prefill(self, request: RequestView, now: float) -> bool:
        """Join a queued group of the same model with room, else open a group at the tail of
        the instance that would finish it soonest (queued work + switches + this prefill).
        False when no instance can prefill."""
        candidates = self._prefill_lanes()
        if not candidates:
            return False
        if self._join_decoding_batch(request):
            return True
        for instance_id in candidates:
            for group in self.lanes[instance_id].groups:
                if group.model == request.model and len(group.request_ids) < GROUP_CAP:
                    group.request_ids.append(request.request_id)
                    request.instance_id = instance_id
                    return True
        best = min(candidates, key=lambda i: self._prefill_finish_time(i, request, now))
        self.lanes[best].groups.append(PrefillGroup(request.model, [request.request_id]))
        request.instance_id = best
        return True

    def _join_decoding_batch(self, request: RequestView) -> bool:
        """On a "both" instance already decoding this model, the request rides along in that
        batch's next turn (the worker prefills new members first): no switch of its own.
        Disaggregated prefill instances cannot do this; it is what "both" buys."""
        for instance_id, view in self.instances.items():
            if view.role != "both":
                continue
            for batch in self.lanes[instance_id].batches:
                if batch.model == request.model and self._fits(
                    batch, request, view.kv_capacity_tokens
                ):
                    batch.request_ids.append(request.request_id)
                    batch.visited = False
                    request.instance_id = instance_id
                    return True
        return False

    def _prefill_finish_time(self, instance_id: str, request: RequestView, now: float) -> float:
        lane, view = self.lanes[instance_id], self.instances[instance_id]
        t = max(lane.busy_until, now)
        if view.role == "both":  # groups wait for the decode turns they alternate with
            t += self._round_time(lane)
        model = view.resident_model
        for group in [*lane.groups, PrefillGroup(request.model, [request.request_id])]:
            if group.model != model:
                t += self.est.switch_time(group.model)
                model = group.model
            t += self.est.prefill_time(group.model, self._prompt_lens(group.request_ids))
        return t

    def _prefill_turn(self, instance_id: str, now: float) -> TurnPlan | None:
        lane = self.lanes[instance_id]
        while lane.groups:
            group = lane.groups.popleft()
            ids = [r for r in group.request_ids if r in self.requests]
            if ids:
                break
        else:
            return None
        plan = TurnPlan(instance_id, group.model, ids, quota_s=0.0, prefill_only=True)
        plan.prefetch_model = self._upcoming_model(instance_id, group.model)
        if self.instances[instance_id].role == "prefill":
            targets = {r: self._choose_decode_instance(self.requests[r]) for r in ids}
            plan.handoff = {r: d for r, d in targets.items() if d is not None}
        cost = self.est.prefill_time(group.model, self._prompt_lens(ids))
        self._start(instance_id, plan, now, cost)
        return plan
