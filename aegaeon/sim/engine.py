"""The discrete-event simulator: the real policy classes driven against a cost model.

Events are arrivals (from the trace) and turn ends. After each event every idle instance is
asked for its next turn, and every busy one whether to restage its prefetch
(``Policy.prefetch_now``), exactly as the scheduler service does with real workers. A turn is
executed at once, in closed form, by :mod:`aegaeon.sim.instance` (switch, KV swap-in, prefill,
decode steps until the quota, KV swap-out), which also stamps each token's time; the turn's end
is then queued as an event. Token times feed :mod:`aegaeon.slo_metrics`.

After a turn that switched models, the policy's estimator is told what the switch cost, through
``observe_switch(model, exposed_s, copied_bytes, prefetched_bytes)`` when it has that method —
the scheduler service does the same with each ``TurnDone``, so quotas learn the same measured
exposed switch time in simulation as live.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field

from aegaeon.scheduler.estimators import Estimator, observe_turn
from aegaeon.scheduler.policies.base import InstanceView, Policy, RequestView, Slo
from aegaeon.sim.device import ENGINE_WEIGHT_SLOTS
from aegaeon.sim.instance import CONTROL_OVERHEAD_S, SimInstance, SimRequest
from aegaeon.slo_metrics import RequestRecord, summarize
from aegaeon.workload import TraceRequest


@dataclass
class SimResult:
    """What a simulated run produced."""

    records: list[RequestRecord]
    metrics: dict
    turns: int = 0
    switches: int = 0
    rejected: int = 0
    end_time: float = 0.0
    last_alpha: float | None = None
    busy_s: dict[str, float] = field(default_factory=dict)
    switch_s: float = 0.0  # total over instances
    kv_move_s: float = 0.0
    contended_s: float = 0.0  # KV moves' delay from sharing the link with a prefetch


def simulate(
    trace: Sequence[TraceRequest],
    policy: Policy,
    instances: Sequence[InstanceView],
    cost: Estimator,
    slo: Slo,
    *,
    drain_s: float = 120.0,
    slots: int | None = ENGINE_WEIGHT_SLOTS,
    control_s: float = CONTROL_OVERHEAD_S,
    contention: bool = True,
) -> SimResult:
    """Replay ``trace`` through ``policy`` on simulated ``instances`` priced by ``cost``.

    The run stops when every request is done or ``drain_s`` after the last arrival; requests
    still open then count as unfinished. ``slots``: weight slots per instance (the engine's 2,
    the default); None holds models by each instance's weight byte budget. ``control_s``: the
    scheduler↔worker round trip paid per turn; ``contention``: a prefetch copy and a KV move
    share the host link.
    """
    sims = {
        v.instance_id: SimInstance(v, cost, slots=slots, control_s=control_s,
                                   contention=contention)
        for v in instances
    }  # fmt: skip
    observe = getattr(policy.estimator, "observe_switch", None)
    started: dict[str, float] = {}  # instance → when its running turn was dispatched
    for view in instances:
        policy.add_instance(view)
    requests = {r.request_id: SimRequest(r) for r in trace}
    horizon = (trace[-1].arrival if trace else 0.0) + drain_s
    events: list[tuple[float, int, str]] = []
    idle = set(sims)
    pending_plans: dict[str, tuple] = {}
    rejected = turns = 0
    now = 0.0
    order = 0

    def dispatch(now: float) -> None:
        nonlocal order, turns
        for instance_id in sorted(idle):
            plan = policy.next_turn(instance_id, now)
            if plan is None:
                continue
            sim = sims[instance_id]
            end, result = sim.execute(plan, requests, now)
            started[instance_id] = now
            pending_plans[instance_id] = (plan, result, sim.last_switch)
            idle.discard(instance_id)
            order += 1
            turns += 1
            heapq.heappush(events, (end, order, instance_id))

    arrivals = iter(trace)
    nxt = next(arrivals, None)
    while nxt is not None or events:
        if nxt is not None and (not events or nxt.arrival <= events[0][0]):
            now = nxt.arrival
            arrived = RequestView(nxt.request_id, nxt.model, nxt.prompt_len, nxt.output_len, now)
            if policy.submit(arrived, now) is not None:
                rejected += 1
            nxt = next(arrivals, None)
        else:
            now, _, instance_id = heapq.heappop(events)
            if now > horizon:
                break
            plan, result, switched = pending_plans.pop(instance_id)
            if observe is not None and switched is not None:  # reported with the turn's end
                observe(switched.model, switched.exposed_s, switched.copied_bytes,
                        switched.prefetched_bytes)  # fmt: skip
            round_trip = now - started[instance_id] - result.elapsed_s  # as the scheduler does
            observe_turn(policy.estimator, plan, policy.requests, result, round_trip)
            policy.turn_done(instance_id, plan, result, now)
            idle.add(instance_id)
        dispatch(now)
        for instance_id in sorted(set(sims) - idle):  # as the scheduler restages busy workers
            staged = policy.prefetch_now(instance_id)
            if staged is not None:
                sims[instance_id].start_prefetch(staged, now)
    records = [r.record() for r in requests.values()]
    return SimResult(
        records=records,
        metrics=summarize(records, slo),
        turns=turns,
        switches=sum(s.switches for s in sims.values()),
        rejected=rejected,
        end_time=now,
        last_alpha=getattr(policy, "last_alpha", None),
        busy_s={i: s.busy_s for i, s in sims.items()},
        switch_s=sum(s.switch_s for s in sims.values()),
        kv_move_s=sum(s.kv_move_s for s in sims.values()),
        contended_s=sum(s.link.contended_s for s in sims.values()),
    )
