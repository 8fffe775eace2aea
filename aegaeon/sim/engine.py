"""The discrete-event simulator: the real policy classes driven against a cost model.

Events are arrivals (from the trace) and turn ends. After each event every idle instance is
asked for its next turn, and each busy one the event touched whether to restage its prefetch
(``Policy.prefetch_now``): the instance where an arrival was placed, or where the requests of an
ended turn went next (a hand-off target); and the instance whose turn ended, if it is left idle
(it may stage a model for the next arrival). The scheduler service asks every worker; the
answers are the same, since a busy instance's next switch changes only with what its own queues
hold (deadlines are absolute times), only those instances' queues changed, and an idle one is
given a model only when first asked after its turn. A turn is
executed at once, in closed form, by :mod:`aegaeon.sim.instance` (switch, KV swap-in, prefill,
decode steps until the quota, KV swap-out), which also stamps each token's time; the turn's end
is then queued as an event. Token times feed :mod:`aegaeon.slo_metrics`.

Only idle instances that an event may have given work are asked for a turn: the one whose turn
ended, and those the event's requests were placed on. The others answered None before and
nothing was placed on them since. A policy answers None only for an instance that holds no work
of its own, and such a call changes nothing (the contract in ``policies/base.py``; true of every
registered policy), so the turns are those of asking every idle instance, without a scan of the
fleet per event.

On a fleet (``fleet``, :mod:`aegaeon.sim.nodes`) each instance's switches and prefetches first
wait for the weights to reach its node's host memory; with ``fleet.setup.locality`` the policy
gets the fleet as its locality hint (``Policy.locality``), read at the event's time.

A search for the fewest GPUs only needs to know whether a run reaches its attainment target:
with ``stop_below`` the run stops as soon as so many requests have certainly missed the SLO
(strict view: rejected, no first token by its deadline, or finished with a late token) that the
target is out of reach (:class:`SloMisses`). Such a run's metrics hold only the strict
attainment, the share of requests that finished within the SLO (so far, when stopped: below the
target as the whole run's would be); ``summarize(result.records, slo)`` gives every view.

After a turn that switched models, the policy's estimator is told what the switch cost, through
``observe_switch(model, exposed_s, copied_bytes, prefetched_bytes)`` when it has that method —
the scheduler service does the same with each ``TurnDone``, so quotas learn the same measured
exposed switch time in simulation as live.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

from aegaeon.scheduler.estimators import Estimator, observe_turn
from aegaeon.scheduler.policies.base import InstanceView, Policy, RequestView, Slo
from aegaeon.sim.device import ENGINE_WEIGHT_SLOTS
from aegaeon.sim.instance import CONTROL_OVERHEAD_S, SimInstance, SimRequest
from aegaeon.sim.nodes import Fleet, NodeCache
from aegaeon.slo_metrics import RequestRecord, meets_slo, summarize
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
    fetch_wait_s: float = 0.0  # of switch_s: turns waiting for weights to reach their node
    fetches: dict = field(default_factory=dict)  # fleet only: Fleet.stats()
    stopped_early: bool = False  # stop_below: the target was out of reach


class SloMisses:
    """Requests that can no longer meet the SLO (strict view, :func:`meets_slo`), counted as
    the run goes: rejected ones, those without a first token by its deadline (a token stamped
    later comes later still), and finished ones with a late token."""

    def __init__(self, total: int, slo: Slo, target: float) -> None:
        self.total, self.slo, self.target = total, slo, target
        self.missed: set[str] = set()
        self.met = 0  # finished within the SLO
        self.due: list[tuple[float, str]] = []  # (first token's deadline, request id)

    def arrived(self, request: TraceRequest, rejected: bool) -> None:
        if rejected:
            self.missed.add(request.request_id)
        else:
            deadline = request.arrival + self.slo.ttft_s + 1e-9  # as meets_slo compares
            heapq.heappush(self.due, (deadline, request.request_id))

    def finished(self, request: SimRequest) -> None:
        t = request.trace
        times = cast("Sequence[float]", request.times[: request.generated])  # read as an array
        record = RequestRecord(t.request_id, t.model, t.arrival, t.output_len, times, request.done)
        if meets_slo(record, self.slo):
            self.met += 1
        else:
            self.missed.add(t.request_id)

    def at(self, now: float, requests: dict[str, SimRequest]) -> None:
        """Count the requests whose first token was due before ``now`` and is not (on time)."""
        while self.due and self.due[0][0] < now:
            deadline, request_id = heapq.heappop(self.due)
            request = requests[request_id]
            if request.generated == 0 or request.times[0] > deadline:
                self.missed.add(request_id)

    @property
    def hopeless(self) -> bool:
        """Even if every other request met the SLO, attainment would miss the target."""
        return (self.total - len(self.missed)) / self.total < self.target


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
    fleet: Fleet | None = None,
    stop_below: float | None = None,
) -> SimResult:
    """Replay ``trace`` through ``policy`` on simulated ``instances`` priced by ``cost``.

    The run stops when every request is done or ``drain_s`` after the last arrival; requests
    still open then count as unfinished. ``slots``: weight slots per instance (the engine's 2,
    the default); None holds models by each instance's weight byte budget. ``control_s``: the
    scheduler↔worker round trip paid per turn; ``contention``: a prefetch copy and a KV move
    share the host link; ``fleet``: the nodes' weight caches (None: every model in host memory);
    ``stop_below``: stop once strict attainment can no longer reach it, and measure only that
    (see the module docstring).
    """
    sims = {
        v.instance_id: SimInstance(v, cost, slots=slots, control_s=control_s,
                                   contention=contention, node=_node(fleet, v))
        for v in instances
    }  # fmt: skip
    if fleet is not None and fleet.setup.locality:
        policy.locality = fleet
    observe = getattr(policy.estimator, "observe_switch", None)
    started: dict[str, float] = {}  # instance → when its running turn was dispatched
    for view in instances:
        policy.add_instance(view)
    requests = {r.request_id: SimRequest(r) for r in trace}
    horizon = (trace[-1].arrival if trace else 0.0) + drain_s
    events: list[tuple[float, int, str]] = []
    idle = set(sims)
    awake = set(sims)  # idle instances that may have work (see the module docstring)
    pending_plans: dict[str, tuple] = {}
    rejected = turns = 0
    now = 0.0
    order = 0
    misses = SloMisses(len(trace), slo, stop_below) if stop_below and trace else None
    stopped = False

    def dispatch(now: float) -> None:
        nonlocal order, turns
        for instance_id in sorted(awake):
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
            if misses is not None:
                for request_id in result.finished:
                    misses.finished(requests[request_id])

    arrivals = iter(trace)
    nxt = next(arrivals, None)
    while nxt is not None or events:
        if nxt is not None and (not events or nxt.arrival <= events[0][0]):
            now = nxt.arrival
            if fleet is not None:
                fleet.now = now
            arrived = RequestView(nxt.request_id, nxt.model, nxt.prompt_len, nxt.output_len, now)
            refused = policy.submit(arrived, now) is not None
            rejected += refused
            if misses is not None:
                misses.arrived(nxt, refused)
            touched, ended = [nxt.request_id], None
            nxt = next(arrivals, None)
        else:
            now, _, instance_id = heapq.heappop(events)
            if now > horizon:
                break
            if fleet is not None:
                fleet.now = now
            plan, result, switched = pending_plans.pop(instance_id)
            if observe is not None and switched is not None:  # reported with the turn's end
                observe(switched.model, switched.exposed_s, switched.copied_bytes,
                        switched.prefetched_bytes)  # fmt: skip
            round_trip = now - started[instance_id] - result.elapsed_s  # as the scheduler does
            observe_turn(policy.estimator, plan, policy.requests, result, round_trip)
            policy.turn_done(instance_id, plan, result, now)
            idle.add(instance_id)
            awake.add(instance_id)
            touched, ended = plan.request_ids, instance_id
        awake |= _where(policy, touched) & idle
        dispatch(now)
        awake.clear()
        asked = _where(policy, touched) - idle  # see the module docstring
        if ended is not None and ended in idle:
            asked.add(ended)  # nothing to run: it may stage a model for the next arrival
        for instance_id in sorted(asked):
            staged = policy.prefetch_now(instance_id)
            if staged is not None:
                sims[instance_id].start_prefetch(staged, now)
        if misses is not None:
            misses.at(now, requests)
            if misses.hopeless:
                stopped = True
                break
    records = [r.record() for r in requests.values()]
    return SimResult(
        records=records,
        metrics={"attainment": misses.met / misses.total} if misses else summarize(records, slo),
        turns=turns,
        switches=sum(s.switches for s in sims.values()),
        rejected=rejected,
        end_time=now,
        last_alpha=getattr(policy, "last_alpha", None),
        busy_s={i: s.busy_s for i, s in sims.items()},
        switch_s=sum(s.switch_s for s in sims.values()),
        kv_move_s=sum(s.kv_move_s for s in sims.values()),
        contended_s=sum(s.link.contended_s for s in sims.values()),
        fetch_wait_s=sum(s.fetch_wait_s for s in sims.values()),
        fetches=fleet.stats() if fleet is not None else {},
        stopped_early=stopped,
    )


def _where(policy: Policy, request_ids: Sequence[str]) -> set[str]:
    """The instances the policy placed these requests on (those still open)."""
    views = (policy.requests.get(r) for r in request_ids)
    return {v.instance_id for v in views if v is not None and v.instance_id is not None}


def _node(fleet: Fleet | None, view: InstanceView) -> NodeCache | None:
    return fleet.cache(view.node) if fleet is not None else None
