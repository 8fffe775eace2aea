"""Which model an aegaeon instance stages in its free weight slot while a turn runs: the model
of the first turn after it that needs a switch, so that switch finds its weights copied. Pure.

It is named twice: with the turn (``TurnPlan.prefetch_model``), and again while the turn runs
when the expected next turn changed (a request of another model arrived): the driver asks
:meth:`PrefetchChoice.prefetch_now` after each arrival and tells the busy worker.
"""

from __future__ import annotations

from aegaeon.scheduler.policies.aegaeon_lanes import AegaeonBase, DecodeBatch


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
        if lane is None or view is None or not view.busy or lane.running is None:
            return None
        model = self._upcoming_model(instance_id, lane.running)
        if model is None or model == lane.staged:
            return None
        lane.staged = model
        return model
