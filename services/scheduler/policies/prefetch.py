"""Which model an aegaeon instance stages in its free weight slot while a turn runs: the model
of the first turn after it that needs a switch, so that switch finds its weights copied. Pure.

It is named twice: with the turn (``TurnPlan.prefetch_model``), and again while the turn runs
when the expected next turn changed (a request of another model arrived): the driver asks
:meth:`PrefetchChoice.prefetch_now` after each arrival and tells the busy worker.

An instance whose turn ended with nothing left to run has a free slot and nothing to hide a
copy behind later: the next request will find it idle, and a switch then copies in the
foreground while the request waits. So once per idle spell (the first time the driver asks
after the turn) it stages the model most in demand (:class:`~.demand.Demand`: arrivals that
age with a half-life) that no instance holds in either slot, if its demand is recent
(:data:`~.demand.STAGE_MIN_DEMAND`) and above that of the model the slot would lose, unless
another instance holds that one too. Placement (:mod:`.grouped_prefill`) then sends the model's next
request to the instance that staged it, where the switch only rebinds views.
"""

from __future__ import annotations

from aegaeon.scheduler.policies.aegaeon_lanes import AegaeonBase, DecodeBatch, Lane
from aegaeon.scheduler.policies.demand import STAGE_MIN_DEMAND


class PrefetchChoice(AegaeonBase):
    """The next switch's model, as the driver's next ``next_turn`` would choose it."""

    def _upcoming_model(self, instance_id: str, running: str) -> str | None:
        """The model of the first turn after the running one (of ``running``) that switches,
        read without touching the books, as ``next_turn`` will choose when the running turn
        ends: the head prefill group if its first request is due before every batch's next
        token (the running batch's deadline moved on by the tokens of its turn), else the
        round's next batch (earliest deadline among those not yet visited, else among all);
        when that one is of the running model, the other."""
        lane, role = self.lanes[instance_id], self.instances[instance_id].role

        def waiting(ids: list[str]) -> bool:
            return any(r in self.requests for r in ids)

        def due(batch: DecodeBatch) -> float:
            return self._deadline(batch) + (lane.running_shift if batch.model == running else 0.0)

        group = next((g for g in lane.groups if waiting(g.request_ids)), None) if role != "decode" else None  # fmt: skip
        batches = [b for b in lane.batches if waiting(b.request_ids)] if role != "prefill" else []
        others = [b for b in batches if b.model != running]
        batch = min([b for b in others if not b.visited] or others, key=due, default=None)
        prefill_next = group is not None and all(self._group_due(group) <= due(b) for b in batches)
        for choice in (group, batch) if prefill_next else (batch, group):
            if choice is not None and choice.model != running:
                return choice.model
        return None

    def prefetch_now(self, instance_id: str) -> str | None:
        lane, view = self.lanes.get(instance_id), self.instances.get(instance_id)
        if lane is None or view is None:
            return None
        if not view.busy:
            return self._stage_while_idle(instance_id, lane)
        if lane.running is None:
            return None
        model = self._upcoming_model(instance_id, lane.running)
        if model is None or model == lane.staged:
            return None
        lane.staged = model
        return model

    def _stage_while_idle(self, instance_id: str, lane: Lane) -> str | None:
        """The model an idle instance copies into its free slot (see the module docstring)."""
        if (
            not lane.stage_when_idle
            or lane.groups
            or any(r in self.requests for b in lane.batches for r in b.request_ids)
        ):
            return None  # asked already this idle spell, or work is waiting for its turn
        lane.stage_when_idle = False
        if instance_id in self.pins:
            return None  # the pinned model holds the other slot
        held: dict[str, int] = {}  # model → instances holding it in a slot
        for other_id, view in self.instances.items():
            for model in {view.resident_model, self.lanes[other_id].standby}:
                if model is not None:
                    held[model] = held.get(model, 0) + 1
        wanted = [m for m in self.models if m not in held and self.demand.of(m) >= STAGE_MIN_DEMAND]  # fmt: skip
        if not wanted:
            return None
        model = min(wanted, key=lambda m: (-self.demand.of(m), m))
        losing = lane.standby
        if losing is not None and held.get(losing, 0) < 2 and self.demand.of(losing) >= self.demand.of(model):  # fmt: skip
            return None
        lane.standby = model
        return model
