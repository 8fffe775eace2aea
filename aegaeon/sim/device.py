"""What a simulated instance's device holds and what its host link carries.

- :class:`Residency`: which models' weights are on the device. With ``slots`` it mirrors the
  engine (``EngineConfig.weight_slots``: the resident model and one prefetched model; a switch
  to a model not in a slot copies into the slot the current model does not use, as
  ``Engine._free_slot`` does). Without slots it holds whatever fits a byte budget (MuxServe's
  co-location by memory).
- :class:`HostLink`: the host↔device link of one instance. A background weight copy (prefetch)
  and a KV move (swap in/out, hand-off) that run at once share it fairly: while both run each
  goes at half speed, so each is delayed by the overlap, ``min(kv_s, copy_left_s)``. On a fleet
  a copy may start later than asked, once its weights have reached the node
  (:mod:`aegaeon.sim.nodes`); a KV move before that start does not share the link with it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

ENGINE_WEIGHT_SLOTS = 2  # services/gpu-worker/engine.py EngineConfig.weight_slots


class Residency:
    """Models whose weights are on the device, least recently used first."""

    def __init__(self, budget_bytes: int, slots: int | None = ENGINE_WEIGHT_SLOTS) -> None:
        self.budget = budget_bytes
        self.slots = slots
        self.models: OrderedDict[str, int] = OrderedDict()
        self.pinned: str | None = None  # never evicted (Engine.pin)

    def __contains__(self, model: str) -> bool:
        return model in self.models

    def touch(self, model: str) -> None:
        self.models.move_to_end(model)

    def drop(self, model: str) -> None:
        self.models.pop(model, None)

    def admit(self, model: str, size: int, keep: str | None = None) -> None:
        """Put ``model`` on the device, evicting the least recently used models other than
        ``keep`` (the model the device is running) until it fits."""
        if model in self.models:
            self.touch(model)
            return
        while self._full(size):
            # One slot, or the pinned model in the only other one: the running model's own
            # slot is overwritten (Engine._free_slot).
            free = [m for m in self.models if m not in (keep, self.pinned)]
            victim = next(iter(free or [m for m in self.models if m != self.pinned] or self.models))
            del self.models[victim]
        self.models[model] = size

    def can_prefetch(self, current: str | None) -> bool:
        """A prefetch needs a slot besides the running model's that the pinned model does not
        hold (Engine.start_prefetch)."""
        if self.slots is None:
            return True
        pinned_elsewhere = (
            self.pinned is not None and self.pinned != current and self.pinned in self
        )
        return self.slots - (1 if pinned_elsewhere else 0) >= 2

    def _full(self, size: int) -> bool:
        if not self.models:
            return False
        if self.slots is not None:
            return len(self.models) >= self.slots
        return sum(self.models.values()) + size > self.budget


@dataclass
class _Copy:
    model: str
    start: float
    copy_s: float  # link time the copy needs alone
    delay_s: float = 0.0  # added by KV moves sharing the link

    @property
    def end(self) -> float:
        return self.start + self.copy_s + self.delay_s


class HostLink:
    """One instance's host↔device link: at most one background weight copy, plus KV moves."""

    def __init__(self, contention: bool = True) -> None:
        self.contention = contention
        self.copy: _Copy | None = None
        self.contended_s = 0.0  # total delay KV moves suffered from a copy in flight

    def start_copy(self, model: str, start: float, copy_s: float) -> None:
        self.copy = _Copy(model, start, copy_s)

    def abandon_copy(self) -> None:
        self.copy = None

    def copy_left(self, t: float) -> float:
        """Link seconds the background copy still needs at ``t`` (0: done or none)."""
        if self.copy is None:
            return 0.0
        return max(0.0, self.copy.end - max(t, self.copy.start))

    def copy_wait(self, t: float) -> float:
        """Seconds from ``t`` until the background copy is done (its start may be later)."""
        if self.copy is None:
            return 0.0
        if self.copy.start > t:
            return self.copy.end - t
        return self.copy_left(t)

    def move_kv(self, t: float, kv_s: float) -> float:
        """A KV move of ``kv_s`` (alone) starting at ``t``: how long it takes. A copy in flight
        and the move share the link, so both are delayed by the overlap."""
        if kv_s <= 0 or not self.contention or self.copy is None:
            return kv_s
        if self.copy.start > t:  # the copy waits for its weights to reach the node
            overlap = max(0.0, min(kv_s - (self.copy.start - t), self.copy_left(t)))
        else:
            overlap = min(kv_s, self.copy_left(t))
        self.copy.delay_s += overlap
        self.contended_s += overlap
        return kv_s + overlap
