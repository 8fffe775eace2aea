"""One simulated instance executing TurnPlans against a cost model, in closed form.

A turn costs, in order::

    control round trip (the scheduler's RunTurn → worker, TurnDone → scheduler)
    → switch (unless the model is current: a rebind if it is in a slot or its prefetch is done,
      else the rest of the copy; on a fleet, a copy first waits for the weights to reach the
      node's host memory, :mod:`aegaeon.sim.nodes`)
    → the plan's prefetch starts copying in the background
    → KV swap-in of requests whose KV is not on this device (sharing the link with the prefetch)
    → one prefill step for the requests not yet prefilled (their first token), and one that
      recomputes the KV the plan's ``drop_kv`` dropped (their next token)
    → decode steps until the quota (timed from the first step), the batch empties or max_steps
    → KV swap-out (swap_out_after, or a handoff to another instance through the host pool)

Resident weights: :class:`~aegaeon.sim.device.Residency` (by the engine's slots, or by bytes);
the link: :class:`~aegaeon.sim.device.HostLink`. Decode steps between two request completions
form an arithmetic series (each step adds one token per request), so they are priced with numpy
in one go and their end times become the tokens' timestamps.

``CONTROL_OVERHEAD_S``, the per-turn control cost, was measured on the 2-core development CPU
(shared, so an upper bound): a real nats-server, the scheduler's and a worker's ``Bus``, a
``RunTurn`` of 8 requests published and the worker answering ``TurnDone`` → median 0.40 ms
(p90 0.48 ms) over 350 round trips; the policies' ``turn_done`` + ``next_turn`` add ≈ 0.05 ms
per turn (aegaeon, 16 models, timed inside a simulated run). Sum, rounded: 0.5 ms.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from aegaeon.scheduler.estimators import TURN_OVERHEAD_PRIOR_S, Estimator
from aegaeon.scheduler.policies.base import InstanceView, TurnPlan, TurnResult
from aegaeon.sim.device import ENGINE_WEIGHT_SLOTS, HostLink, Residency
from aegaeon.sim.nodes import NodeCache
from aegaeon.slo_metrics import RequestRecord
from aegaeon.workload import TraceRequest

CONTROL_OVERHEAD_S = TURN_OVERHEAD_PRIOR_S  # one definition: the estimators' prior is this measure


class SimRequest:
    """A request's simulated life: token timestamps and where its KV is."""

    __slots__ = ("done", "generated", "kv_lost", "kv_node", "kv_on", "times", "trace")

    def __init__(self, trace: TraceRequest) -> None:
        self.trace = trace
        self.times = np.zeros(trace.output_len)
        self.generated = 0
        self.done = False
        self.kv_on: str | None = None  # instance holding its KV on device; None: host / none
        self.kv_lost = False  # dropped (drop_kv): its next turn recomputes it
        self.kv_node: NodeCache | None = None  # the node whose host memory holds its KV

    @property
    def context(self) -> int:
        return self.trace.prompt_len + self.generated

    def record(self) -> RequestRecord:
        t = self.trace
        times = self.times[: self.generated].tolist()
        return RequestRecord(t.request_id, t.model, t.arrival, t.output_len, times, self.done)


@dataclass
class SwitchInfo:
    """What a switch cost, as a worker reports it: seconds the turn waited, bytes copied while
    it waited, bytes copied in the background before (by a prefetch)."""

    model: str
    exposed_s: float
    copied_bytes: int
    prefetched_bytes: int


class SimInstance:
    """An instance's device state: resident weights, the link and a prefetch on it, busy time."""

    def __init__(
        self,
        view: InstanceView,
        cost: Estimator,
        *,
        slots: int | None = ENGINE_WEIGHT_SLOTS,
        control_s: float = CONTROL_OVERHEAD_S,
        contention: bool = True,
        node: NodeCache | None = None,
    ) -> None:
        self.id = view.instance_id
        self.cost = cost
        self.node = node  # its node's host cache (None: every model is in host memory)
        self.control_s = control_s
        self.residency = Residency(view.weight_budget_bytes, slots)
        self.link = HostLink(contention)
        self.current: str | None = None
        self.last_switch: SwitchInfo | None = None  # of the last executed turn
        self.switches = 0
        self.busy_s = 0.0
        self.switch_s = 0.0  # of busy_s: switching, moving KV, stepping
        self.kv_move_s = 0.0
        self.fetch_wait_s = 0.0  # of switch_s: waiting for weights to reach the node

    def _copy_s(self, model: str) -> float:
        p = self.cost.profiles[model]
        return p.weight_bytes / p.link_bytes_per_s

    def _in_host(self, model: str, t: float) -> float:
        """When ``model``'s weights are in host memory, ready to copy (``t`` off a fleet)."""
        if self.node is None:
            return t
        return self.node.ready_at(model, self.cost.profiles[model].weight_bytes, t)

    def switch_cost(self, model: str, now: float) -> float:
        """Make ``model`` current; the time the turn waits for it (also in ``last_switch``)."""
        self.last_switch = None
        if model == self.current:
            self.residency.touch(model)
            return 0.0
        profile = self.cost.profiles[model]
        size, copy_s = profile.weight_bytes, self._copy_s(model)
        flight = self.link.copy
        if flight is not None and flight.model == model:
            left, wait = self.link.copy_left(now), self.link.copy_wait(now)
            copied = int(size * min(1.0, left / copy_s)) if copy_s > 0 else 0
            info = SwitchInfo(model, profile.switch_fixed_s + wait, copied, size - copied)
            self.fetch_wait_s += wait - left
        elif model in self.residency:
            info = SwitchInfo(model, profile.switch_fixed_s, 0, 0)
        else:
            fetch = self._in_host(model, now) - now
            info = SwitchInfo(model, profile.switch_fixed_s + fetch + copy_s, size, 0)
            self.fetch_wait_s += fetch
        if flight is not None and flight.model != model and self.link.copy_left(now) > 0:
            self.residency.drop(flight.model)  # the copy stops half done: that slot is garbage
        self.link.abandon_copy()
        self.residency.admit(model, size, keep=self.current)
        self.current = model
        self.switches += 1
        self.last_switch = info
        return info.exposed_s

    def start_prefetch(self, model: str, t: float) -> None:
        """Copy ``model`` into the free slot in the background from ``t`` (as the worker does
        while the turn runs); nothing to do when it is current or already in a slot."""
        if (model == self.current or model in self.residency
                or not self.residency.can_prefetch(self.current)):  # fmt: skip
            return
        self.residency.admit(model, self.cost.profiles[model].weight_bytes, keep=self.current)
        self.link.start_copy(model, self._in_host(model, t), self._copy_s(model))

    def execute(
        self, plan: TurnPlan, requests: dict[str, SimRequest], now: float
    ) -> tuple[float, TurnResult]:
        """Run ``plan`` from ``now``: its end time and what the policy is told."""
        for request_id in plan.drop_kv:
            lost = requests[request_id]
            lost.kv_on, lost.kv_lost = None, lost.generated > 0
        self.residency.pinned = plan.pinned
        batch = [requests[r] for r in plan.request_ids if not requests[r].done]
        begin = now + self.control_s
        switch = self.switch_cost(plan.model, begin)
        t = begin + switch
        if plan.prefetch_model:
            self.start_prefetch(plan.prefetch_model, t)
        moved = self._swap_in(plan.model, [r for r in batch if not r.kv_lost], t)
        t += moved
        t = self._recompute(plan.model, [r for r in batch if r.kv_lost], t)
        prefill_start = t
        t = self._prefill(plan.model, [r for r in batch if r.generated == 0], t)
        prefill_s, decode_start = t - prefill_start, t
        steps = 0
        if not plan.prefill_only:
            t, steps = self._decode(plan, [r for r in batch if not r.done], t)
        leaving = [
            r
            for r in batch
            if not r.done and (plan.swap_out_after or r.trace.request_id in plan.handoff)
        ]
        swapped_out = self._swap_out(plan.model, leaving, t)
        t += swapped_out
        moved += swapped_out
        self.busy_s += t - now
        self.switch_s += switch
        self.kv_move_s += moved
        result = TurnResult(
            steps=steps,
            elapsed_s=t - begin,
            switch_s=switch,
            finished=[r.trace.request_id for r in batch if r.done],
            generated={r.trace.request_id: r.generated for r in batch},
            prefill_s=prefill_s if plan.prefill_only else 0.0,
            decode_steps=steps,
            decode_s=t - swapped_out - decode_start if steps else 0.0,
        )
        return t, result

    def _swap_in(self, model: str, batch: list[SimRequest], t: float) -> float:
        """KV of the batch not on this device comes in over the host link; KV a prefill left
        in another node's host memory first crosses to this node's (the worker-to-worker
        transfer, at this node's network rate, which it is taken to get alongside fetches)."""
        arriving = [r for r in batch if r.generated and r.kv_on != self.id]
        remote = sum(r.context for r in arriving if r.kv_node not in (None, self.node))
        for r in batch:
            r.kv_on, r.kv_node = self.id, None
        across = 0.0
        if remote and self.node is not None:
            kv_bytes = remote * self.cost.profiles[model].kv_bytes_per_token
            across = kv_bytes / self.node.bandwidth
        tokens = sum(r.context for r in arriving)
        moved = (
            self.link.move_kv(t + across, self.cost.kv_move_time(model, tokens)) if tokens else 0.0
        )
        return across + moved

    def _swap_out(self, model: str, leaving: list[SimRequest], t: float) -> float:
        for r in leaving:
            r.kv_on, r.kv_node = None, self.node
        tokens = sum(r.context for r in leaving)
        return self.link.move_kv(t, self.cost.kv_move_time(model, tokens)) if tokens else 0.0

    def _prefill(self, model: str, new: list[SimRequest], t: float) -> float:
        if not new:
            return t
        t += self.cost.prefill_time(model, [r.trace.prompt_len for r in new])
        for r in new:
            r.times[0] = t
            r.generated = 1
            r.done = r.trace.output_len <= 1
        return t

    def _recompute(self, model: str, lost: list[SimRequest], t: float) -> float:
        """Dropped KV comes back by a prefill of prompt + tokens so far, which also yields the
        next token (as the engine's recompute step does)."""
        if not lost:
            return t
        t += self.cost.prefill_time(model, [r.context for r in lost])
        for r in lost:
            r.kv_lost, r.kv_on = False, self.id
            r.times[r.generated] = t
            r.generated += 1
            r.done = r.generated >= r.trace.output_len
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
