"""Which model an aegaeon turn stages in the free weight slot while it runs (the model of the
turn after it), so that the next switch finds its weights already copied. Pure."""

from __future__ import annotations

from aegaeon.scheduler.policies.aegaeon_lanes import AegaeonBase


class PrefetchChoice(AegaeonBase):
    """The next turn's model, named in ``TurnPlan.prefetch_model``."""

    def _next_model_after_prefill(self, instance_id: str, model: str) -> str | None:
        """After a prefill group: on a "both" instance the most urgent decode batch (decode
        turns alternate with groups there), else the next group."""
        lane = self.lanes[instance_id]
        nxt: str | None = None
        self._drop_empty_batches(lane)
        if self.instances[instance_id].role == "both" and lane.batches:
            nxt = lane.batches[self._round_order(lane)[0]].model
        elif lane.groups:
            nxt = lane.groups[0].model
        return nxt if nxt != model else None

    def _peek_next_model(self, instance_id: str, order: list[int]) -> str | None:
        """After a decode turn: the next group on a "both" instance, else the next batch of the
        round (or the most urgent other batch when the round ends)."""
        lane = self.lanes[instance_id]
        if self.instances[instance_id].role == "both" and lane.groups:
            return lane.groups[0].model
        if len(order) > 1:
            return lane.batches[order[1]].model
        others = [b for i, b in enumerate(lane.batches) if i != order[0]]
        return min(others, key=self._deadline).model if others else None
