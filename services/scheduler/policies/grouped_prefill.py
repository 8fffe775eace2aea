"""Aegaeon's grouped prefill (DESIGN.md §6, Algorithm 1). Pure.

Prefill instances hold queues of *groups* (one model, ≤ GROUP_CAP requests)::

    prefill p0:  [A: r1 r4 r7] → [B: r2] → [A: r9]     a new A request joins a queued A group
                  ^ running     ^ prefetched           with room, else a new group goes to the
                                                       instance that would finish it first

A turn prefills one group after one switch (its first tokens), and on a prefill instance
``TurnPlan.handoff`` names the decode instance each request's KV goes to. On a "both"
instance already decoding the request's model, the request instead rides along in that batch's
next turn (the worker prefills new members first): no switch of its own.

Priority classes (:mod:`aegaeon.priority`): a new group queues behind the groups of its class
and higher ones only, and the queue is reordered by class before each turn, a group whose request has waited past
the maximum wait going first.

With a locality hint (``Policy.locality``) a switch on an instance also pays the time to bring
its model's weights to the instance's node, so a new group goes where its first token comes
soonest counting that transfer: a node that caches the model wins among otherwise equal lanes.

A switch to the model in an instance's other weight slot (``Lane.standby``: the model it ran
before, or one it staged) only rebinds views, so a new group counts no switch there: a request
goes to the idle instance that still holds its model rather than one that must copy it.
"""

from __future__ import annotations

import math
from collections import deque

from aegaeon.scheduler.policies.aegaeon_lanes import (
    GROUP_CAP,
    AegaeonBase,
    Lane,
    PrefillGroup,
    switch_slots,
)
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
        if self.pins:
            candidates = self._pinned_first(candidates, request.model)
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
        best = self._soonest_prefill(candidates, request, now)
        self.lanes[best].groups.append(PrefillGroup(request.model, [request.request_id]))
        self._order_groups(self.lanes[best], now)
        request.instance_id = best
        return True

    def _order_groups(self, lane: Lane, now: float) -> None:
        """Where the lane's groups are of several classes: a group with a request past the
        maximum wait first, then higher classes, first come first served within each (by the
        group's oldest request). Groups of one class keep their queue as it is."""
        if len({self.class_rank(g.model) for g in lane.groups}) <= 1:
            return
        ids = [r for g in lane.groups for r in g.request_ids if r in self.requests]
        ranks = self.ranks(ids, now)

        def key(group: PrefillGroup) -> tuple[int, float]:
            live = [r for r in group.request_ids if r in ranks]
            return (min((ranks[r] for r in live), default=self.class_rank(group.model)),
                    min((self.requests[r].arrival for r in live), default=float("inf")))  # fmt: skip

        lane.groups = deque(sorted(lane.groups, key=key))

    def _groups_ahead(self, lane: Lane, model: str) -> list[PrefillGroup]:
        """The groups a new group of ``model`` would queue behind: those of its class or a
        higher one (all of them with one class)."""
        mine = self.class_rank(model)
        return [g for g in lane.groups if self.class_rank(g.model) <= mine]

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

    def _soonest_prefill(self, candidates: list[str], request: RequestView, now: float) -> str:
        """The candidate whose new group for ``request`` would finish first (the first listed
        among equals). A lane finishes no sooner than it is free, plus the switch to the model
        when the lane's last model is another, plus this prefill alone (every other term is
        ≥ 0), so lanes whose bound is past the best found need not be priced: the answer is the
        same as pricing every lane, in a fraction of the time on a fleet."""
        alone = self.est.prefill_time(request.model, self._prompt_lens([request.request_id]))
        switch = self.est.switch_time(request.model)
        near = self.fetch_times(candidates, request.model) if self.locality is not None else {}
        bounds = sorted((self._prefill_bound(i, request, now, switch, near.get(i), alone), k, i)
                        for k, i in enumerate(candidates))  # fmt: skip
        best, best_t, best_k = candidates[0], math.inf, len(candidates)
        for bound, k, instance_id in bounds:
            if (bound, k) > (best_t, best_k):
                break
            t = self._prefill_finish_time(instance_id, request, now)
            if t < best_t or (t == best_t and k < best_k):
                best, best_t, best_k = instance_id, t, k
        return best

    def _prefill_bound(
        self, instance_id: str, request: RequestView, now: float, switch: float,
        fetch: float | None, alone: float,
    ) -> float:  # fmt: skip
        """A lower bound of :meth:`_prefill_finish_time`, summed in the same order
        (``fetch``: the locality hint's time for the lane's node, None without one)."""
        lane = self.lanes[instance_id]
        t = max(lane.busy_until, now)
        if request.model not in self._slots_after(instance_id, self._groups_ahead(lane, request.model)):  # fmt: skip
            t += switch
            if fetch is not None:
                t += fetch
        return t + alone

    def _slots_after(self, instance_id: str, groups: list[PrefillGroup]) -> tuple[str | None, str | None]:  # fmt: skip
        """The models in the instance's two weight slots once ``groups`` have run: each switch
        leaves the model before it in the other slot, so switching back is a rebind."""
        model, standby = self.instances[instance_id].resident_model, self.lanes[instance_id].standby
        pinned = self.pins.get(instance_id)  # holds the other slot for good
        for group in groups:
            model, standby = switch_slots(model, standby, group.model, pinned)
        return model, standby

    def _prefill_finish_time(self, instance_id: str, request: RequestView, now: float) -> float:
        lane, view = self.lanes[instance_id], self.instances[instance_id]
        t = max(lane.busy_until, now)
        if view.role == "both":  # groups wait for the decode turns they alternate with
            t += self._round_time(lane)
        model, standby, pinned = view.resident_model, lane.standby, self.pins.get(instance_id)
        ahead = self._groups_ahead(lane, request.model)
        for group in [*ahead, PrefillGroup(request.model, [request.request_id])]:
            if group.model not in (model, standby):
                t += self.est.switch_time(group.model)
                if self.locality is not None:
                    t += self.fetch_s(instance_id, group.model)
            model, standby = switch_slots(model, standby, group.model, pinned)
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
            # Decode on this node where there is room: the KV then stays in its host memory.
            targets = {r: self._choose_decode_instance(self.requests[r], instance_id) for r in ids}
            plan.handoff = {r: d for r, d in targets.items() if d is not None}
        cost = self.est.prefill_time(group.model, self._prompt_lens(ids))
        self._start(instance_id, plan, now, cost)
        return plan
