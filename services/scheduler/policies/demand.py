"""How much each model is asked for lately: arrivals, each counting less as it ages. Pure.

The aegaeon policy stages the model most in demand on an idle instance (:mod:`.prefetch`).
"""

from __future__ import annotations

import math

DEMAND_HALF_LIFE_S = 60.0
"""An arrival counts half as much a minute later: the models staged follow the recent mix."""
STAGE_MIN_DEMAND = 0.5
"""Stage only a model with about one arrival within the last half-life: one asked long ago
(whose weights keep-alive may have unloaded) stays where it is."""


class Demand:
    """Arrivals per model, each decaying with :data:`DEMAND_HALF_LIFE_S`. Pure."""

    def __init__(self) -> None:
        self._score: dict[str, tuple[float, float]] = {}  # model → (score, as of this time)
        self.now = 0.0  # the latest arrival's time: scores are read as of then

    def arrived(self, model: str, now: float) -> None:
        self.now = max(self.now, now)
        self._score[model] = (self.of(model) + 1.0, self.now)

    def of(self, model: str) -> float:
        score, at = self._score.get(model, (0.0, self.now))
        return score * math.exp2(-(self.now - at) / DEMAND_HALF_LIFE_S)

    def forget(self, model: str) -> None:
        self._score.pop(model, None)
