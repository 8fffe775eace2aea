"""What the three parts of the aegaeon policy share: its books per instance (groups waiting
for prefill, batches in the decode rotation) and the small readings of them every part makes.
Pure.

The parts: :mod:`.grouped_prefill` (Algorithm 1), :mod:`.decode_rounds` (Algorithm 2),
:mod:`.prefetch` (which model to stage next); :mod:`.aegaeon` puts them together.
"""

from __future__ import annotations

from abc import abstractmethod
from collections import deque
from dataclasses import dataclass, field

from aegaeon.scheduler.policies.base import (
    ModelSpec,
    Policy,
    RequestView,
    Slo,
    StepTimeEstimator,
    TurnPlan,
)
from aegaeon.scheduler.policies.default_costs import DefaultEstimator
from aegaeon.scheduler.policies.demand import Demand
from aegaeon.scheduler.policies.quota import qmax_for

GROUP_CAP = 8
MAX_DECODE_BATCH = 256
KV_LOOKAHEAD_TOKENS = 48  # a few 16-token blocks of growth room per request


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
class Lane:
    """The policy's books for one instance."""

    groups: deque[PrefillGroup] = field(default_factory=deque)
    batches: list[DecodeBatch] = field(default_factory=list)
    busy_until: float = 0.0  # estimated end of the running turn
    running: str | None = None  # the running turn's model (None: idle)
    staged: str | None = None  # the model named for its free weight slot during that turn
    running_shift: float = 0.0  # how far that turn moves its batch's deadline (tokens × TBT)
    # The model in its other weight slot, as its turns and stagings left it: a switch to it
    # rebinds views (the engine's slots keep the previous resident model, or a prefetched one).
    standby: str | None = None
    stage_when_idle: bool = False  # a turn ended: if it stays idle, it may stage a model once


def switch_slots(
    resident: str | None, standby: str | None, model: str, pinned: str | None
) -> tuple[str, str | None]:
    """The two weight slots (resident, other) after a turn of ``model``: a switch leaves the
    model before it in the other slot (the engine copies into the slot the resident one does
    not use; with none resident, into an empty one), or the pinned model, which holds that
    slot for good."""
    if model == resident:
        return resident, standby
    return model, pinned or (standby if resident is None else resident)


class AegaeonBase(Policy):
    """State and shared readings of the aegaeon policy; the parts subclass it."""

    def __init__(
        self,
        models: dict[str, ModelSpec],
        slo: Slo,
        estimator: StepTimeEstimator | None = None,
    ) -> None:
        super().__init__(models, slo, estimator)
        self.est: StepTimeEstimator = estimator or DefaultEstimator()
        self.lanes: dict[str, Lane] = {}
        self.unplaced: deque[str] = deque()  # arrived while no instance could take it
        self.last_alpha: float = 0.0
        self.pins: dict[str, str] = {}  # instance → the model it keeps resident (ModelSpec.pin)
        self.qmax_s = qmax_for(slo.ttft_s)  # the longest quota
        self.alone_quota_s = min(self.qmax_s, max(slo.ttft_s / 8, 10 * slo.tbt_s))
        self.demand = Demand()  # arrivals per model, recent ones counting most (staging)

    # ------------------------------------------------------------ one part asks another

    @abstractmethod
    def _choose_decode_instance(
        self, request: RequestView, near: str | None = None
    ) -> str | None: ...

    @abstractmethod
    def _round_time(self, lane: Lane) -> float: ...

    @abstractmethod
    def _upcoming_model(self, instance_id: str, running: str) -> str | None: ...

    @abstractmethod
    def _order_groups(self, lane: Lane, now: float) -> None: ...

    # ------------------------------------------------------------ pinning

    def _assign_pins(self) -> None:
        """Each model with ``pin = N`` is kept on N instances, one model per instance (the
        engine's second slot stays free for the others). Pins that still hold stay where they
        are; new ones go to unpinned instances, those already holding the model first, then
        "both" before "decode" before "prefill", in join order. Fewer instances than pins:
        the higher classes, then names, first."""
        wanted = {m: s.pin for m, s in self.models.items() if s.pin > 0}
        kept: dict[str, str] = {}
        for instance_id, model in self.pins.items():
            if instance_id in self.instances and sum(m == model for m in kept.values()) < wanted.get(model, 0):  # fmt: skip
                kept[instance_id] = model
        role_order = {"both": 0, "decode": 1, "prefill": 2}
        for model in sorted(wanted, key=lambda m: (self.class_rank(m), m)):
            free = [i for i in self.instances if i not in kept]
            free.sort(key=lambda i: (self.instances[i].resident_model != model,
                                     role_order[self.instances[i].role]))  # fmt: skip
            missing = wanted[model] - sum(m == model for m in kept.values())
            for instance_id in free[: max(0, missing)]:
                kept[instance_id] = model
        self.pins = kept

    def _pinned_first(self, candidates: list[str], model: str) -> list[str]:
        """The candidates pinned to ``model`` when there are any (it is served there), else all."""
        pinned = [i for i in candidates if self.pins.get(i) == model]
        return pinned or candidates

    # ------------------------------------------------------------ readings

    def _lens(self, batch: DecodeBatch) -> list[int]:
        return [self.requests[r].context_len for r in batch.request_ids if r in self.requests]

    def _step_time(self, batch: DecodeBatch) -> float:
        return self.est.decode_time(batch.model, self._lens(batch) or [1])

    def _switch_times(self, models: list[str]) -> dict[str, float]:
        return {m: self.est.switch_time(m) for m in set(models)}

    def _measured_switches(self, models: list[str]) -> dict[str, float]:
        """Exposed switch times workers measured, for the models the estimator has seen."""
        exposed = getattr(self.est, "exposed_switch_time", None)
        if exposed is None:
            return {}
        seen = {m: exposed(m) for m in set(models)}
        return {m: s for m, s in seen.items() if s is not None}

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

    def _prompt_lens(self, request_ids: list[str]) -> list[int]:
        return [self.requests[r].prompt_len for r in request_ids if r in self.requests]

    def _group_due(self, group: PrefillGroup) -> float:
        """When the group's first request is due its first token."""
        return (
            min(
                (self.requests[r].arrival for r in group.request_ids if r in self.requests),
                default=float("inf"),
            )
            + self.slo.ttft_s
        )

    def _round_order(self, lane: Lane) -> list[int]:
        """Batches still to visit this round, most urgent first (ties: rotation order).
        When every batch has had its turn, a new round starts."""
        pending = [i for i, b in enumerate(lane.batches) if not b.visited]
        if not pending:
            for batch in lane.batches:
                batch.visited = False
            pending = list(range(len(lane.batches)))
        return sorted(pending, key=lambda i: (self._deadline(lane.batches[i]), i))

    def _drop_empty_batches(self, lane: Lane) -> None:
        for batch in lane.batches:
            batch.request_ids = [r for r in batch.request_ids if r in self.requests]
        lane.batches = [b for b in lane.batches if b.request_ids]

    def _start(self, instance_id: str, plan: TurnPlan, now: float, work_s: float) -> None:
        view, lane = self.instances[instance_id], self.lanes[instance_id]
        plan.pinned = self.pins.get(instance_id)
        if plan.prefetch_model is None and plan.pinned not in (None, plan.model):
            plan.prefetch_model = plan.pinned  # nothing else to stage: bring the pinned one back
        at_hand = plan.model in (view.resident_model, lane.standby)
        switch = 0.0 if at_hand else self.est.switch_time(plan.model)
        lane.busy_until = now + switch + work_s
        lane.running, lane.staged, lane.running_shift = plan.model, plan.prefetch_model, 0.0
        view.busy = True
