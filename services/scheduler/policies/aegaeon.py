"""Aegaeon's token-level policy: grouped prefill (Algorithm 1) and weighted round-robin decode
with SLO-derived quotas (Algorithm 2), as DESIGN.md §6 states them.

Prefill instances hold queues of *groups* (one model, ≤ 8 requests)::

    prefill p0:  [A: r1 r4 r7] → [B: r2] → [A: r9]     a new A request joins a queued A group
                  ^ running     ^ prefetched           with room, else a new group goes to the
                                                       instance that would finish it first
Decode instances hold *batches* (one model each, packed first-fit by KV) visited in rotation::

    decode d0:   [A: r1 r4] (q_A) → [C: r3 r5] (q_C) → [B: r2] (q_B) → [A …]
                  each batch steps for its quota q_i after its switch, swaps its KV out when
                  others wait, and the next batch's model is prefetched meanwhile

Within a round batches go most urgent first (earliest next-token deadline), so a newcomer
does not wait for the round to come back to it. After a prefill on a prefill instance,
``TurnPlan.handoff`` names the decode instance each request's KV goes to (through the host KV
pool): the one already decoding that model while its α stays ≤ 1, else the one with the lowest α.

An instance of role "both" does both. A request whose model it is already decoding rides along
in that batch's next turn (the worker prefills new members first: no switch of its own); other
requests form groups as above. Groups and batches are taken earliest deadline first, and a
round's quotas are scaled down together to fit in half the TTFT target, since on such an
instance a round also delays first tokens.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

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
from aegaeon.scheduler.policies.quota import (
    QMAX_S,
    cyclic_switch_costs,
    prefetched_round_quotas,
)

GROUP_CAP = 8
MAX_DECODE_BATCH = 256
KV_LOOKAHEAD_TOKENS = 48  # a few 16-token blocks of growth room per request
BOTH_ROUND_SHARE = 0.5  # a "both" instance's round takes at most this share of the TTFT target
PACK_ALPHA = 1.0  # join an instance already decoding the model while its α stays ≤ this


@dataclass
class PrefillGroup:
    """Requests of one model prefilled together after one switch."""

    model: str
    request_ids: list[str] = field(default_factory=list)


@dataclass
class DecodeBatch:
    """Requests of one model decoded together; one entry of the round-robin rotation."""

    model: str
    request_ids: list[str] = field(default_factory=list)
    visited: bool = False  # already had its turn in the current round


@dataclass
class _Lane:
    """The policy's books for one instance."""

    groups: deque[PrefillGroup] = field(default_factory=deque)
    batches: list[DecodeBatch] = field(default_factory=list)
    busy_until: float = 0.0  # estimated end of the running turn


class _DefaultEstimator:
    """Used only when the driver gives none: a 7B-on-H100-like guess, so α stays defined."""

    def prefill_time(self, model: str, prompt_lens: list[int]) -> float:
        return 0.01 + 2e-5 * sum(prompt_lens)

    def decode_time(self, model: str, context_lens: list[int]) -> float:
        return 0.01 + 1e-7 * sum(context_lens) + 1e-4 * len(context_lens)

    def switch_time(self, model: str) -> float:
        return 0.3


class AegaeonPolicy(Policy):
    """Grouped prefill + weighted round-robin decode with SLO quotas (``--policy aegaeon``)."""

    name = "aegaeon"

    def __init__(
        self,
        models: dict[str, ModelSpec],
        slo: Slo,
        estimator: StepTimeEstimator | None = None,
    ) -> None:
        super().__init__(models, slo, estimator)
        self.est: StepTimeEstimator = estimator or _DefaultEstimator()
        self.lanes: dict[str, _Lane] = {}
        self.unplaced: deque[str] = deque()  # arrived while no prefill instance existed
        self.last_alpha: float = 0.0
        self.alone_quota_s = min(QMAX_S, max(slo.ttft_s / 8, 10 * slo.tbt_s))

    # ------------------------------------------------------------ membership

    def add_instance(self, instance: InstanceView) -> None:
        super().add_instance(instance)
        self.lanes[instance.instance_id] = _Lane()
        pending, self.unplaced = self.unplaced, deque()
        for request_id in pending:
            request = self.requests.get(request_id)
            if request is not None and request.prefilled:
                self._after_prefill(request, None)
            elif request is not None:
                self._place_for_prefill(request, 0.0)

    def remove_instance(self, instance_id: str) -> list[RequestView]:
        self.lanes.pop(instance_id, None)
        return super().remove_instance(instance_id)

    # ------------------------------------------------------------ Algorithm 1: grouped prefill

    def submit(self, request: RequestView, now: float) -> Rejection | None:
        if request.model not in self.models:
            return Rejection(f"model {request.model!r} is not registered", status=404)
        self.requests[request.request_id] = request
        self._place_for_prefill(request, now)
        return None

    def _prefill_lanes(self) -> list[str]:
        return [i for i, v in self.instances.items() if v.role in ("prefill", "both")]

    def _place_for_prefill(self, request: RequestView, now: float) -> None:
        """Join a queued group of the same model with room, else open a group at the tail of
        the instance that would finish it soonest (queued work + switches + this prefill)."""
        candidates = self._prefill_lanes()
        if not candidates:
            self.unplaced.append(request.request_id)
            return
        if self._join_decoding_batch(request):
            return
        for instance_id in candidates:
            for group in self.lanes[instance_id].groups:
                if group.model == request.model and len(group.request_ids) < GROUP_CAP:
                    group.request_ids.append(request.request_id)
                    request.instance_id = instance_id
                    return
        best = min(candidates, key=lambda i: self._prefill_finish_time(i, request, now))
        self.lanes[best].groups.append(PrefillGroup(request.model, [request.request_id]))
        request.instance_id = best

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

    def _prompt_lens(self, request_ids: list[str]) -> list[int]:
        return [self.requests[r].prompt_len for r in request_ids if r in self.requests]

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
        plan.prefetch_model = self._next_model_after_prefill(instance_id, group.model)
        if self.instances[instance_id].role == "prefill":
            targets = {r: self._choose_decode_instance(self.requests[r]) for r in ids}
            plan.handoff = {r: d for r, d in targets.items() if d is not None}
        cost = self.est.prefill_time(group.model, self._prompt_lens(ids))
        self._start(instance_id, plan, now, cost)
        return plan

    def _next_model_after_prefill(self, instance_id: str, model: str) -> str | None:
        lane = self.lanes[instance_id]
        nxt: str | None = None
        self._drop_empty_batches(lane)
        if self.instances[instance_id].role == "both" and lane.batches:
            nxt = lane.batches[self._round_order(lane)[0]].model
        elif lane.groups:
            nxt = lane.groups[0].model
        return nxt if nxt != model else None

    # ------------------------------------------------------------ Algorithm 2: decode

    def _choose_decode_instance(self, request: RequestView) -> str | None:
        """Where the request's KV goes for decoding. An instance already decoding its model
        takes it while that keeps its α ≤ 1 (no extra switch); otherwise the instance whose
        rotation load (α before its 0.5 floor) stays lowest, which balances TBT headroom."""
        best, best_key = None, (2, float("inf"))
        context = request.context_len + 1
        for instance_id, view in self.instances.items():
            if view.role not in ("decode", "both"):
                continue
            batches = self.lanes[instance_id].batches
            models = [b.model for b in batches]
            steps = [self._step_time(b) for b in batches]
            has_model = request.model in models
            if has_model:
                i = models.index(request.model)
                steps[i] = self.est.decode_time(request.model, [*self._lens(batches[i]), context])
            else:
                models.append(request.model)
                steps.append(self.est.decode_time(request.model, [context]))
            alpha = self._raw_alpha(models, steps)
            key = (0 if has_model and alpha <= PACK_ALPHA else 1, alpha)
            if key < best_key:
                best, best_key = instance_id, key
        return best

    def _raw_alpha(self, models: list[str], steps: list[float]) -> float:
        switch = {m: self.est.switch_time(m) for m in set(models)}
        c = sum(cyclic_switch_costs(models, switch))
        n_min = min(self.slo.tbt_s / t for t in steps)
        return c / (n_min * QMAX_S) + sum(t / self.slo.tbt_s for t in steps)

    def _lens(self, batch: DecodeBatch) -> list[int]:
        return [self.requests[r].context_len for r in batch.request_ids if r in self.requests]

    def _step_time(self, batch: DecodeBatch) -> float:
        return self.est.decode_time(batch.model, self._lens(batch) or [1])

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

    def _fits(self, batch: DecodeBatch, request: RequestView, capacity: int) -> bool:
        if len(batch.request_ids) >= MAX_DECODE_BATCH:
            return False
        used = sum(n + KV_LOOKAHEAD_TOKENS for n in self._lens(batch))
        return used + request.context_len + KV_LOOKAHEAD_TOKENS <= capacity

    def _deadline(self, batch: DecodeBatch) -> float:
        """When the batch's most urgent request is due its next token."""
        return min(
            (self.requests[r].arrival + self.slo.ttft_s + self.requests[r].generated * self.slo.tbt_s
             for r in batch.request_ids if r in self.requests),
            default=float("inf"),
        )  # fmt: skip

    def _round_order(self, lane: _Lane) -> list[int]:
        """Batches still to visit this round, most urgent first (ties: rotation order).
        When every batch has had its turn, a new round starts."""
        pending = [i for i, b in enumerate(lane.batches) if not b.visited]
        if not pending:
            for batch in lane.batches:
                batch.visited = False
            pending = list(range(len(lane.batches)))
        return sorted(pending, key=lambda i: (self._deadline(lane.batches[i]), i))

    def _decode_turn(self, instance_id: str, now: float) -> TurnPlan | None:
        lane = self.lanes[instance_id]
        self._drop_empty_batches(lane)
        if not lane.batches:
            return None
        order = self._round_order(lane)
        index = order[0]
        batch = lane.batches[index]
        quota = self._quota(lane, index, self.instances[instance_id].role)
        batch.visited = True
        others_wait = len(lane.batches) > 1 or bool(lane.groups)
        nxt = self._peek_next_model(instance_id, order)
        plan = TurnPlan(
            instance_id,
            batch.model,
            list(batch.request_ids),
            quota_s=quota,
            swap_out_after=others_wait,
            prefetch_model=nxt if nxt != batch.model else None,
        )
        self._start(instance_id, plan, now, quota)
        return plan

    def _quota(self, lane: _Lane, index: int, role: str = "decode") -> float:
        """Algorithm 2's quota of batch ``index`` over the batches of the current round.

        On a "both" instance new requests ride along in their model's next turn, so a round
        also delays first tokens, which the formula (written for decode instances, whose
        requests already had theirs) does not see: there the quotas are scaled down together,
        keeping their ratios, until a round fits in BOTH_ROUND_SHARE of the TTFT target.
        """
        models = [b.model for b in lane.batches]
        steps = [self._step_time(b) for b in lane.batches]
        switch = {m: self.est.switch_time(m) for m in set(models)}
        kv = sum(self._kv_move_time(b) for b in lane.batches) if len(lane.batches) > 1 else 0.0
        alpha, quotas, c = prefetched_round_quotas(models, steps, switch, self.slo.tbt_s, kv)
        self.last_alpha = alpha
        if c <= 0:
            return self.alone_quota_s
        if role == "both":
            room = BOTH_ROUND_SHARE * self.slo.ttft_s - c
            total = sum(quotas)
            if total > room > 0:
                return quotas[index] * room / total
        return quotas[index]

    def _peek_next_model(self, instance_id: str, order: list[int]) -> str | None:
        """The model of the next turn, to prefetch: the next group on a "both" instance, else
        the next batch of the round (or the most urgent other batch when the round ends)."""
        lane = self.lanes[instance_id]
        if self.instances[instance_id].role == "both" and lane.groups:
            return lane.groups[0].model
        if len(order) > 1:
            return lane.batches[order[1]].model
        others = [b for i, b in enumerate(lane.batches) if i != order[0]]
        return min(others, key=self._deadline).model if others else None

    def _round_time(self, lane: _Lane) -> float:
        """Estimated length of one round of this lane's decode rotation."""
        if not lane.batches:
            return 0.0
        models = [b.model for b in lane.batches]
        steps = [self._step_time(b) for b in lane.batches]
        switch = {m: self.est.switch_time(m) for m in set(models)}
        _, quotas, c = prefetched_round_quotas(models, steps, switch, self.slo.tbt_s)
        return c + (sum(quotas) if c > 0 else self.alone_quota_s)

    def _kv_move_time(self, batch: DecodeBatch) -> float:
        """A batch's KV in and out once per round (estimators that know the link say how long)."""
        move = getattr(self.est, "kv_move_time", None)
        return 2 * move(batch.model, sum(self._lens(batch))) if move else 0.0

    def _drop_empty_batches(self, lane: _Lane) -> None:
        for batch in lane.batches:
            batch.request_ids = [r for r in batch.request_ids if r in self.requests]
        lane.batches = [b for b in lane.batches if b.request_ids]

    # ------------------------------------------------------------ driver calls

    def next_turn(self, instance_id: str, now: float) -> TurnPlan | None:
        view, lane = self.instances.get(instance_id), self.lanes.get(instance_id)
        if view is None or lane is None or view.busy:
            return None
        if view.role == "prefill":
            return self._prefill_turn(instance_id, now)
        if view.role == "decode":
            return self._decode_turn(instance_id, now)
        if lane.groups and self._prefill_first(lane):
            return self._prefill_turn(instance_id, now) or self._decode_turn(instance_id, now)
        return self._decode_turn(instance_id, now) or self._prefill_turn(instance_id, now)

    def _prefill_first(self, lane: _Lane) -> bool:
        """On a "both" instance: the group's first tokens are due before the most urgent
        batch's next token (earliest deadline first), or no batch waits."""
        self._drop_empty_batches(lane)
        if not lane.batches:
            return True
        group = lane.groups[0]
        due = min(
            (self.requests[r].arrival for r in group.request_ids if r in self.requests),
            default=float("inf"),
        )
        return due + self.slo.ttft_s <= min(self._deadline(b) for b in lane.batches)

    def _start(self, instance_id: str, plan: TurnPlan, now: float, work_s: float) -> None:
        view = self.instances[instance_id]
        switch = self.est.switch_time(plan.model) if plan.model != view.resident_model else 0.0
        self.lanes[instance_id].busy_until = now + switch + work_s
        view.busy = True

    def turn_done(self, instance_id: str, plan: TurnPlan, result: TurnResult, now: float) -> None:
        view = self.instances.get(instance_id)
        if view is not None:
            view.busy = False
            view.resident_model = plan.model
            self.lanes[instance_id].busy_until = now
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
