"""Aegaeon's batched decode with weighted round-robin (DESIGN.md §6, Algorithm 2). Pure.

Decode instances hold *batches* (one model each, packed first-fit by KV) visited in rotation::

    decode d0:   [A: r1 r4] (q_A) → [C: r3 r5] (q_C) → [B: r2] (q_B) → [A …]
                  each batch steps for its quota q_i after its switch, swaps its KV out when
                  others wait, and the next batch's model is prefetched meanwhile

Within a round batches go most urgent first (earliest next-token deadline), so a newcomer
does not wait for the round to come back to it. Quotas come from :mod:`.quota` with ``c`` the
switch time a round really pays (measured where workers reported it), and a round is capped at
ROUND_SHARE of the TTFT target on every instance (:func:`.quota.capped_round` says why).
A batch's quota is weighted by its model's priority class (:data:`aegaeon.priority.QUOTA_WEIGHT`)
before that cap, which keeps the weighted ratios.
"""

from __future__ import annotations

from aegaeon.scheduler.policies.aegaeon_lanes import AegaeonBase, DecodeBatch, Lane
from aegaeon.scheduler.policies.base import RequestView, TurnPlan
from aegaeon.scheduler.policies.quota import (
    ROUND_SHARE,
    capped_round,
    cyclic_switch_costs,
    prefetched_round_quotas,
)

from aegaeon.priority import quota_weight


class DecodeRounds(AegaeonBase):
    """Algorithm 2: where a request decodes, and the quota of each decode turn."""

    def _choose_decode_instance(self, request: RequestView, near: str | None = None) -> str | None:
        """Where the request's KV goes for decoding. An instance with a batch of its model
        that has room takes it, whatever its load (as the paper's artifact dispatches): a
        member costs a batch little, a new batch costs its lane a whole step and a switch per
        round, so spreading a model over lanes under load would only add to every lane's α.
        Among several, and otherwise, the instance whose rotation load (α before its 0.5
        floor) stays lowest with it, which balances TBT headroom. With a locality hint, the
        time to bring the model's weights to the instance's node counts once in that round's
        switch time ``c``: a node that caches it wins among otherwise equal lanes.

        Lanes with room are found first and only they are priced when there are any (they
        win whatever the others' α): the same answer as pricing every lane. Between lanes of
        equal α, one on the node of ``near`` (the prefill instance) wins: there the KV is
        handed over in host memory, elsewhere it crosses the network (a cost far below a
        weight fetch's, which α already counts)."""
        decoding = [(i, v) for i, v in self.instances.items() if v.role in ("decode", "both")]
        if self.pins:
            pinned = set(self._pinned_first([i for i, _ in decoding], request.model))
            decoding = [(i, v) for i, v in decoding if i in pinned]
        rooms = {i: self._room(i, request) for i, _ in decoding}
        with_room = [i for i, _ in decoding if rooms[i] is not None]
        node = self.instances[near].node if near in self.instances else None

        def rank(instance_id: str) -> tuple[float, bool]:
            alpha = self._alpha_with(instance_id, request, rooms[instance_id])
            return alpha, node is None or self.instances[instance_id].node != node

        return min(with_room or [i for i, _ in decoding], key=rank, default=None)

    def _room(self, instance_id: str, request: RequestView) -> int | None:
        """The first batch of the request's model on this lane with room for it."""
        capacity = self.instances[instance_id].kv_capacity_tokens
        batches = self.lanes[instance_id].batches
        return next(
            (i for i, b in enumerate(batches)
             if b.model == request.model and self._fits(b, request, capacity)),
            None,
        )  # fmt: skip

    def _alpha_with(self, instance_id: str, request: RequestView, room: int | None) -> float:
        """The lane's rotation load (α before its floor) with the request in batch ``room``,
        or in a new batch of its own."""
        batches = self.lanes[instance_id].batches
        models = [b.model for b in batches]
        steps = [self._step_time(b) for b in batches]
        context = request.context_len + 1
        if room is not None:
            steps[room] = self.est.decode_time(request.model, [*self._lens(batches[room]), context])
        else:
            models.append(request.model)
            steps.append(self.est.decode_time(request.model, [context]))
        if self.locality is None:
            return self._raw_alpha(models, steps)
        return self._raw_alpha(models, steps, self.fetch_s(instance_id, request.model))

    def _raw_alpha(self, models: list[str], steps: list[float], fetch_s: float = 0.0) -> float:
        c = sum(cyclic_switch_costs(models, self._switch_times(models)))
        if fetch_s:
            c += fetch_s
        n_min = min(self.slo.tbt_s / t for t in steps)
        return c / (n_min * self.qmax_s) + sum(t / self.slo.tbt_s for t in steps)

    def _place_for_decode(self, request: RequestView, instance_id: str) -> None:
        """First fit by KV tokens (with look-ahead) among this model's batches, else a new
        batch. Either way the batch is due a turn in the current round: a newcomer's slack
        is its TTFT budget, too short to wait for the next round."""
        lane, view = self.lanes[instance_id], self.instances[instance_id]
        request.instance_id = instance_id
        for batch in lane.batches:
            if batch.model == request.model and self._fits(batch, request, view.kv_capacity_tokens):
                batch.request_ids.append(request.request_id)
                batch.visited = False
                return
        lane.batches.append(DecodeBatch(request.model, [request.request_id]))

    def _decode_turn(self, instance_id: str, now: float) -> TurnPlan | None:
        lane = self.lanes[instance_id]
        self._drop_empty_batches(lane)
        if not lane.batches:
            return None
        order = self._round_order(lane)
        index = order[0]
        batch = lane.batches[index]
        quotas, _ = self._round_quotas(lane)
        quota = min(quotas[index], self._group_slack(lane, batch, now))
        batch.visited = True
        others_wait = len(lane.batches) > 1 or bool(lane.groups)
        plan = TurnPlan(
            instance_id,
            batch.model,
            list(batch.request_ids),
            quota_s=quota,
            swap_out_after=others_wait,
            prefetch_model=self._upcoming_model(instance_id, batch.model),
        )
        self._start(instance_id, plan, now, quota)
        lane.running_shift = quota / self._step_time(batch) * self.slo.tbt_s
        return plan

    def _group_slack(self, lane: Lane, batch: DecodeBatch, now: float) -> float:
        """How long a decode turn may run on a "both" lane before the head prefill group, whose
        switch and prefill follow it, would miss its first token's deadline (unbounded when no
        group waits). Earliest deadline first picks the turn; this keeps it from running its
        whole quota past the group's budget — but only where the batch, cut short, still
        reaches its own next deadline after the group's switch and prefill and its switch
        back: otherwise the cut would only move the miss from the group to the batch."""
        group = next((g for g in lane.groups if any(r in self.requests for r in g.request_ids)), None)  # fmt: skip
        if group is None:
            return float("inf")
        step = self._step_time(batch)
        switch = self.est.switch_time(group.model) if group.model != batch.model else 0.0
        prefill = self.est.prefill_time(group.model, self._prompt_lens(group.request_ids))
        cut = max(step, self._group_due(group) - now - switch - prefill)
        back = self.est.switch_time(batch.model) if switch else 0.0
        banked = self._deadline(batch) + cut / step * self.slo.tbt_s
        return cut if banked >= now + cut + switch + prefill + back else float("inf")

    def _round_quotas(self, lane: Lane) -> tuple[list[float], float]:
        """(quota of each batch, c) for a round of this lane; sets ``last_alpha``.

        Algorithm 2's quotas, or the alone quota each when the round pays no switch, then
        capped so that the round lasts at most ROUND_SHARE of the TTFT target (on decode and
        "both" instances alike), keeping the quotas' ratios.
        """
        models = [b.model for b in lane.batches]
        steps = [self._step_time(b) for b in lane.batches]
        switch = self._switch_times(models)
        kv = sum(self._kv_move_time(b) for b in lane.batches) if len(lane.batches) > 1 else 0.0
        # Each turn of a rotation also pays the control round trip (measured where known): the
        # quotas must amortize it as they amortize the switches, or short quotas on a fast
        # device would spend the round on round trips.
        overhead = getattr(self.est, "turn_overhead_s", None)
        if overhead is not None and len(lane.batches) > 1:
            kv += overhead() * len(lane.batches)
        alpha, quotas, c = prefetched_round_quotas(
            models, steps, switch, self.slo.tbt_s, kv, self._measured_switches(models), self.qmax_s
        )
        if c <= 0:
            quotas = [self.alone_quota_s] * len(models)
        weights = [
            quota_weight(self.models[m].priority) if m in self.models else 1.0 for m in models
        ]
        if any(w != 1.0 for w in weights):  # a higher class: more tokens per round
            quotas = [q * w for q, w in zip(quotas, weights, strict=True)]
        cap = ROUND_SHARE * self.slo.ttft_s
        quotas, capped_alpha = capped_round(quotas, steps, c, self.slo.tbt_s, cap)
        self.last_alpha = max(alpha, capped_alpha or 0.0)
        return quotas, c

    def _round_time(self, lane: Lane) -> float:
        """Estimated length of one round of this lane's decode rotation."""
        if not lane.batches:
            return 0.0
        alpha = self.last_alpha  # an estimate for placement: leave the reported α alone
        quotas, c = self._round_quotas(lane)
        self.last_alpha = alpha
        return c + sum(quotas)

    def _kv_move_time(self, batch: DecodeBatch) -> float:
        """A batch's KV in and out once per round (estimators that know the link say how long)."""
        move = getattr(self.est, "kv_move_time", None)
        return 2 * move(batch.model, sum(self._lens(batch))) if move else 0.0
