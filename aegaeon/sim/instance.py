"""One simulated instance executing TurnPlans against a cost model, in closed form.

A turn costs, in order::

    switch (unless resident; less what a prefetch already copied)
    → KV swap-in of requests whose KV is not on this device
    → one prefill step for the requests not yet prefilled (their first token)
    → decode steps until the quota (timed from the first step), the batch empties or max_steps
    → KV swap-out (swap_out_after, or a handoff to another instance through the host pool)

Resident weights are an LRU set bounded by the instance's weight budget. Decode steps between two
request completions form an arithmetic series (each step adds one token per request), so they
are priced with numpy in one go and their end times become the tokens' timestamps.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from aegaeon.scheduler.estimators import Estimator
from aegaeon.scheduler.policies.base import InstanceView, TurnPlan, TurnResult
from aegaeon.sim.hardware import SWITCH_FIXED_S
from aegaeon.slo_metrics import RequestRecord
from aegaeon.workload import TraceRequest


class SimRequest:
    """A request's simulated life: token timestamps and where its KV is."""

    __slots__ = ("done", "generated", "kv_on", "times", "trace")

    def __init__(self, trace: TraceRequest) -> None:
        self.trace = trace
        self.times = np.zeros(trace.output_len)
        self.generated = 0
        self.done = False
        self.kv_on: str | None = None  # instance holding its KV on device; None: host / none

    @property
    def context(self) -> int:
        return self.trace.prompt_len + self.generated

    def record(self) -> RequestRecord:
        t = self.trace
        times = self.times[: self.generated].tolist()
        return RequestRecord(t.request_id, t.model, t.arrival, t.output_len, times, self.done)


class SimInstance:
    """An instance's device state: resident weights, a prefetch in flight, busy time."""

    def __init__(self, view: InstanceView, cost: Estimator) -> None:
        self.id = view.instance_id
        self.budget = view.weight_budget_bytes
        self.cost = cost
        self.resident: OrderedDict[str, int] = OrderedDict()
        self.prefetch: tuple[str, float] | None = None  # model, time its copy began
        self.switches = 0
        self.busy_s = 0.0
        self.switch_s = 0.0  # of busy_s: switching, moving KV, stepping
        self.kv_move_s = 0.0

    def switch_cost(self, model: str, now: float) -> float:
        """Make ``model`` resident (LRU eviction to fit the budget); the time it takes."""
        if model in self.resident:
            self.resident.move_to_end(model)
            return 0.0
        full = self.cost.switch_time(model)
        if self.prefetch is not None and self.prefetch[0] == model:
            full = max(SWITCH_FIXED_S, full - (now - self.prefetch[1]))
        size = self.cost.profiles[model].weight_bytes
        while self.resident and sum(self.resident.values()) + size > self.budget:
            self.resident.popitem(last=False)
        self.resident[model] = size
        self.switches += 1
        return full

    def execute(
        self, plan: TurnPlan, requests: dict[str, SimRequest], now: float
    ) -> tuple[float, TurnResult]:
        """Run ``plan`` from ``now``: its end time and what the policy is told."""
        batch = [requests[r] for r in plan.request_ids if not requests[r].done]
        switch = self.switch_cost(plan.model, now)
        t = now + switch
        self.prefetch = (plan.prefetch_model, t) if plan.prefetch_model else None
        moved = self._swap_in(plan.model, batch)
        t += moved
        t = self._prefill(plan.model, [r for r in batch if r.generated == 0], t)
        steps = 0
        if not plan.prefill_only:
            t, steps = self._decode(plan, [r for r in batch if not r.done], t)
        leaving = [
            r
            for r in batch
            if not r.done and (plan.swap_out_after or r.trace.request_id in plan.handoff)
        ]
        swapped_out = self._swap_out(plan.model, leaving)
        t += swapped_out
        moved += swapped_out
        self.busy_s += t - now
        self.switch_s += switch
        self.kv_move_s += moved
        result = TurnResult(
            steps=steps,
            elapsed_s=t - now,
            switch_s=switch,
            finished=[r.trace.request_id for r in batch if r.done],
            generated={r.trace.request_id: r.generated for r in batch},
        )
        return t, result

    def _swap_in(self, model: str, batch: list[SimRequest]) -> float:
        tokens = sum(r.context for r in batch if r.generated and r.kv_on != self.id)
        for r in batch:
            r.kv_on = self.id
        return self.cost.kv_move_time(model, tokens) if tokens else 0.0

    def _swap_out(self, model: str, leaving: list[SimRequest]) -> float:
        for r in leaving:
            r.kv_on = None
        tokens = sum(r.context for r in leaving)
        return self.cost.kv_move_time(model, tokens) if tokens else 0.0

    def _prefill(self, model: str, new: list[SimRequest], t: float) -> float:
        if not new:
            return t
        t += self.cost.prefill_time(model, [r.trace.prompt_len for r in new])
        for r in new:
            r.times[0] = t
            r.generated = 1
            r.done = r.trace.output_len <= 1
        return t

    def _decode(self, plan: TurnPlan, active: list[SimRequest], t: float) -> tuple[float, int]:
        a, b, c = self.cost.profiles[plan.model].decode
        quota_end = t + plan.quota_s
        max_steps = plan.max_steps if plan.max_steps is not None else 1 << 30
        steps = 0
        while active and steps < max_steps and (steps == 0 or t < quota_end):
            size = len(active)
            total = sum(r.context for r in active)
            m = min(min(r.trace.output_len - r.generated for r in active), max_steps - steps)
            durations = a + c * size + b * (total + size * np.arange(m))
            ends = t + np.cumsum(durations)
            # A step starts only while the quota lasts (the first one always runs).
            k = max(1, int(np.searchsorted(ends - durations, quota_end, side="left")))
            for r in active:
                r.times[r.generated : r.generated + k] = ends[:k]
                r.generated += k
                r.done = r.generated >= r.trace.output_len
            t = float(ends[k - 1])
            steps += k
            active = [r for r in active if not r.done]
        return t, steps
