"""The simulator beside the measurement: fit a CPU cost model, run the same policy classes on the
same trace, and compare attainment with what the real stack measured.

The cost model is the in-process engine's own step and switch times on this CPU (fitted with the
scheduler's estimator formulas), plus the overhead of the real path: per prefill, the isolated
stack's first-token time minus the engine's; per decode step, what the live workers spent per
step at that very point beyond the engine alone (their ``TurnDone`` timings: under load the
worker shares two cores with the gateway, the scheduler and NATS, which an idle profile does not
see), or, for a point without decode turns, the isolated stack's TBT minus the engine's step; per
turn, the control round trip as the live workers stood between turns at that point (or the
simulator's idle measure). The policy inside the simulation uses the estimator the real
scheduler used (no profile: roofline defaults) and the same SLO, so it makes the same decisions.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aegaeon.bench.serve_priority import by_class
from aegaeon.protocol import SamplingParams, TurnDone
from aegaeon.scheduler.estimators import (
    Estimator,
    ModelProfile,
    fit_decode,
    fit_prefill,
    fit_switch,
    load_estimator,
)
from aegaeon.scheduler.policies import POLICIES, policy_class
from aegaeon.scheduler.policies.base import InstanceView, ModelSpec, Slo
from aegaeon.sim.engine import simulate
from aegaeon.sim.instance import CONTROL_OVERHEAD_S
from aegaeon.workload import TraceRequest

if TYPE_CHECKING:
    from rich.console import Console

    from aegaeon.bench.serve_run import BenchPlan

PREFILL_BATCHES = ([24], [64], [128], [224], [64, 64], [128, 96, 32])
DECODE_BATCH_SIZES = (1, 2, 4)
DECODE_STEPS = 6
ATTAINMENT_VIEWS = ("attainment", "time_fraction_attainment", "artifact_qos")
"""Strict per request, time fraction, the artifact's QoS score (each where the metrics have it)."""
WORKER_THREADS = max(1, (os.cpu_count() or 2) // 2)  # the gpu-worker's default on a CPU


def profile_engine(models_dir: Path, specs: dict[str, ModelSpec], arena_bytes: int) -> Estimator:
    """Measure prefill, decode and switch times of every model on an in-process CPU engine."""
    import torch

    from aegaeon.gpu_worker.engine import Engine, EngineConfig

    threads = torch.get_num_threads()
    torch.set_num_threads(WORKER_THREADS)  # time the engine as the worker runs it
    engine = Engine(EngineConfig(device="cpu", arena_bytes=arena_bytes))
    try:
        for name in specs:
            engine.register_model(name, models_dir / name)
        switches = [_switch_sample(engine, name) for name in [*specs, *specs]]
        return Estimator(
            {name: _profile_model(engine, spec, switches) for name, spec in specs.items()}, "cpu"
        )
    finally:
        engine.close()
        torch.set_num_threads(threads)


def _switch_sample(engine: Any, name: str) -> tuple[int, float]:
    stats = engine.switch_to(name)
    return stats.bytes, stats.seconds


def _profile_model(engine: Any, spec: ModelSpec, switches: list[tuple[int, float]]) -> ModelProfile:
    engine.switch_to(spec.name)
    _prefill(engine, spec.name, [16], "warm")
    prefill = [(lens, _prefill(engine, spec.name, lens, "p")) for lens in PREFILL_BATCHES]
    decode = []
    for size in DECODE_BATCH_SIZES:
        decode.extend(_decode(engine, spec.name, [48 + 40 * i for i in range(size)]))
    copied = [s for s in switches if s[0] > 0]
    fixed, bandwidth = fit_switch(copied) if len(copied) >= 2 else (0.0, 5e9)
    return ModelProfile(fit_prefill(prefill), fit_decode(decode), fixed, bandwidth,
                        spec.weight_bytes, spec.kv_bytes_per_token)  # fmt: skip


def _add(engine: Any, model: str, lens: Sequence[int], tag: str, max_tokens: int) -> list[str]:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    ids = [f"{tag}-{model}-{i}-{n}" for i, n in enumerate(lens)]
    for rid, n in zip(ids, lens, strict=True):
        engine.add_request(rid, model, [16 + (7 * j) % 1000 for j in range(n)], sampling)
    return ids


def _prefill(engine: Any, model: str, lens: Sequence[int], tag: str) -> float:
    ids = _add(engine, model, lens, tag, 2)
    t0 = time.perf_counter()
    engine.step(ids)
    elapsed = time.perf_counter() - t0
    for rid in ids:
        engine.abort(rid)
    return elapsed


def _decode(
    engine: Any, model: str, lens: list[int], tag: str = "d"
) -> list[tuple[list[int], float]]:
    ids = _add(engine, model, lens, tag, DECODE_STEPS + 2)
    engine.step(ids)  # prefill
    samples = []
    for k in range(DECODE_STEPS):
        t0 = time.perf_counter()
        engine.step(ids)
        samples.append(([n + 1 + k for n in lens], time.perf_counter() - t0))
    for rid in ids:
        engine.abort(rid)
    return samples


def add_path_overhead(cost: Estimator, prefill_s: float, decode_s: float) -> Estimator:
    """The same cost model with the real path's fixed cost added per prefill and per step."""
    profiles = {
        name: replace(
            p,
            prefill=(p.prefill[0] + max(0.0, prefill_s), *p.prefill[1:]),
            decode=(p.decode[0] + max(0.0, decode_s), *p.decode[1:]),
        )
        for name, p in cost.profiles.items()
    }
    return Estimator(profiles, cost.device)  # type: ignore[arg-type]


def path_overhead(
    cost: Estimator, model: str, prompt_len: int, output_len: int, ttft_s: float, tbt_s: float
) -> tuple[float, float]:
    """(per-prefill, per-step) time the stack adds over the engine for an isolated request."""
    engine_ttft = cost.prefill_time(model, [prompt_len])
    mid = prompt_len + output_len // 2
    return ttft_s - engine_ttft, tbt_s - cost.decode_time(model, [mid])


def live_step_overhead(
    turns: Sequence[TurnDone], cost: Estimator, trace: Sequence[TraceRequest]
) -> tuple[float, int] | None:
    """(seconds, steps): the mean time a live decode step took beyond ``cost``'s for the same
    model and batch size at the trace's mean mid-request context, over every decode step of
    ``turns``; None when none decoded."""
    if not trace:
        return None
    context = round(sum(r.prompt_len + r.output_len / 2 for r in trace) / len(trace))
    extra, steps = 0.0, 0
    for turn in turns:
        decoded = turn.steps - 1  # the first step of a turn is timed as its prefill_s
        if decoded < 1 or turn.decode_s <= 0 or turn.batch_size < 1:
            continue
        if turn.model not in cost.profiles:
            continue
        extra += turn.decode_s - decoded * cost.decode_time(turn.model, [context] * turn.batch_size)
        steps += decoded
    return (extra / steps, steps) if steps else None


def live_control_overhead(
    turns: Sequence[TurnDone], received_s: Sequence[float]
) -> tuple[float, int] | None:
    """(seconds, turns): the mean time a live worker stood between two turns while work waited
    for it — the control round trip (TurnDone to the scheduler, its next plan, RunTurn back),
    which under load includes waiting for the two shared cores. ``received_s``: when each of
    ``turns`` reached the benchmark. A turn starts ``elapsed_s`` before its TurnDone left, so
    the gap before it is its start less the previous TurnDone's arrival, both seen from here
    (the bus's latency each way is alike and cancels). Only gaps before a turn that prefilled
    nothing count: its requests were already waiting when the turn before ended, so the worker
    was not idle for want of work. None with no such pair."""
    last: dict[str, float] = {}  # worker → arrival of its previous TurnDone
    gaps: list[float] = []
    for turn, at in zip(turns, received_s, strict=True):
        previous = last.get(turn.worker_id)
        if previous is not None and not turn.prefilled and turn.steps > 0:
            gaps.append(at - turn.elapsed_s - previous)
        last[turn.worker_id] = at
    return (max(0.0, sum(gaps) / len(gaps)), len(gaps)) if gaps else None


def simulate_measured(
    trace: Sequence[TraceRequest], policy_name: str, models: dict[str, ModelSpec],
    instances: Sequence[InstanceView], cost: Estimator, slo: Slo, drain_s: float,
    max_wait_s: float | None = None, control_s: float = CONTROL_OVERHEAD_S,
) -> dict:  # fmt: skip
    """Attainment the simulator predicts for one policy on the run's trace and instances.

    The policy inside plans with the estimator the real scheduler had (no profile: roofline
    defaults) for the SLO the real scheduler was given; the run is priced by ``cost`` and
    scored against the same SLO; requests open ``drain_s`` after the last arrival are
    unfinished, as in the replay. ``control_s``: each turn's control round trip."""
    policy_estimator = load_estimator(None, dict(models))
    policy = policy_class(policy_name)(dict(models), slo, policy_estimator)
    if max_wait_s is not None:
        policy.max_wait_s = max_wait_s
    views = [replace(v) for v in instances]
    result = simulate(trace, policy, views, cost, slo, drain_s=drain_s, control_s=control_s)
    found = {key: result.metrics[key] for key in ATTAINMENT_VIEWS if key in result.metrics}
    classes = {name: spec.priority for name, spec in models.items()}
    if max_wait_s is not None and len(set(classes.values())) > 1:
        found["by_class"] = by_class(result.records, classes, slo, max_wait_s)
    return found | {"switches": result.switches, "rejected": result.rejected}


def fit_cost(plan: BenchPlan, console: Console) -> Estimator:
    """The CPU cost model: the in-process engine's times (fitted once) plus this run's path
    overhead (isolated stack latency − the engine's time for the same request); a point with
    live decode turns replaces the per-step part with theirs (:func:`point_cost`)."""
    assert plan.models_dir is not None
    if plan.engine_cost is None:
        console.print("  profiling the engine in-process for the simulator's cost model …")
        plan.engine_cost = profile_engine(plan.models_dir, plan.specs, plan.arena_bytes)
    cost = plan.engine_cost
    iso = plan.isolated
    if "ttft_s" in iso:
        pre, dec = path_overhead(cost, iso["model"], iso["prompt_len"], iso["output_len"],
                                 iso["ttft_s"], iso["tbt_s"])  # fmt: skip
        iso["stack_overhead_prefill_s"], iso["stack_overhead_step_s"] = pre, dec
        cost = add_path_overhead(cost, pre, dec)
    return cost


def simulate_all(plan: BenchPlan, policies: dict[str, dict], console: Console) -> None:
    """Predict every measured point on the same trace, with the same SLO and drain, each priced
    as the live stack ran at that point (:func:`point_cost`, :func:`point_control_s`); adds
    ``sim`` to each point."""
    assert plan.slo is not None
    cost = fit_cost(plan, console)
    for name, res in policies.items():
        if name not in POLICIES:
            continue
        for point in res["points"]:
            trace = plan.traces[point["rate_per_model"]]
            priced = point_cost(plan, cost, point, trace)
            point["sim"] = simulate_measured(trace, name, plan.specs, plan.instances(), priced,
                                             plan.slo, plan.args.drain, plan.max_wait_s,
                                             point_control_s(point))  # fmt: skip


def point_cost(plan: BenchPlan, cost: Estimator, point: dict, trace: list[TraceRequest]) -> Estimator:  # fmt: skip
    """``cost`` with the decode step priced as the live workers ran it at this point: the
    engine's fitted step plus their measured per-step excess (``sim_step_overhead``)."""
    assert plan.engine_cost is not None
    live = live_step_overhead(point.get("turns", []), plan.engine_cost, trace)
    if live is None:
        return cost
    extra_s, steps = live
    point["sim_step_overhead"] = {"seconds": extra_s, "decode_steps": steps}
    prefill_s = plan.isolated.get("stack_overhead_prefill_s", 0.0)
    return add_path_overhead(plan.engine_cost, prefill_s, extra_s)


def point_control_s(point: dict) -> float:
    """Each turn's control round trip as the live workers stood between turns at this point
    (``sim_control_overhead``), or the simulator's idle measure where none was seen."""
    live = live_control_overhead(point.get("turns", []), point.get("turns_received_s", []))
    if live is None:
        return CONTROL_OVERHEAD_S
    seconds, turns = live
    point["sim_control_overhead"] = {"seconds": seconds, "turns": turns}
    return seconds
