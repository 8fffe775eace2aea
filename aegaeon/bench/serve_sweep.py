"""The policies' sweeps of ``bench serve``, measured side by side: one stack per policy (or the
``--url`` gateway), all started before the first request, then rate by rate every policy still
in its sweep replays that rate's trace in turn, the order rotating by one from rate to rate.

Why side by side: the host is shared and its speed drifts over minutes. Measured one policy
after another, a policy's sweep met whatever the host did during its own minutes, and a drift
between two sweeps read as a difference between two policies. Interleaved, each rate's points
are measured within the same stretch of time, and no policy is always measured first. The
stacks not measuring are idle (about 1 % of a core each on the CPU this was written on); a
policy whose sweep is over has its stack stopped at once.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console

from aegaeon.bench.serve_priority import by_class
from aegaeon.bench.serve_replay import Replay, replay, warm_up
from aegaeon.bench.serve_run import BenchPlan
from aegaeon.bench.stack_process import StackProcess
from aegaeon.bench.watch import Watcher
from aegaeon.protocol import SwitchDone, TurnDone, WorkerEvent
from aegaeon.slo_metrics import ATTAINMENT_TARGET, RequestRecord, summarize
from aegaeon.subjects import Subjects

ERROR_LINE = re.compile(r"Traceback|\bERROR\b|\bCRITICAL\b")
T = TypeVar("T")


@dataclass
class Target:
    """One policy under measurement: where its gateway answers, the NATS its workers report
    on, and what its sweep has gathered so far."""

    name: str
    url: str = ""
    nats_url: str | None = None
    subjects: Subjects = field(default_factory=Subjects)
    stack: StackProcess | None = None  # None: a running gateway (--url)
    home: Path | None = None
    points: list[dict] = field(default_factory=list)
    warm_up_failures: dict[str, str] = field(default_factory=dict)
    error: str | None = None  # the stack did not start
    in_sweep: bool = True


Measure = Callable[[BenchPlan, Target, float], Awaitable[dict]]


def rotated(items: Sequence[T], by: int) -> list[T]:
    """``items`` starting at index ``by`` (mod their number): rate i's measuring order."""
    if not items:
        return []
    by %= len(items)
    return [*items[by:], *items[:by]]


def measure_policies(
    plan: BenchPlan, console: Console
) -> tuple[dict[str, dict], dict[str, list[RequestRecord]]]:
    """Every policy's sweep, side by side; per policy its result (points, warm-up failures,
    the stack's error lines) and the records of its highest measured rate (for the plot)."""
    assert plan.slo is not None, "calibrate first"
    with ExitStack() as stacks:
        targets = [_open(plan, name, stacks, console) for name in plan.policies]
        asyncio.run(sweep_side_by_side(plan, [t for t in targets if t.error is None], console))
    results = {t.name: _result(plan, t) for t in targets}
    return results, {name: _highest_rate_records(res) for name, res in results.items()}


def _open(plan: BenchPlan, name: str, stacks: ExitStack, console: Console) -> Target:
    """The policy's target: --url as given, else a stack of its own started now (kept by
    ``stacks`` until every sweep is over)."""
    if plan.url:
        return Target(name, plan.url, plan.args.nats_url, Subjects(plan.args.prefix))
    home = plan.tmp / f"home-{plan.run_index}-{name}"
    stack = StackProcess(home, models_dir=plan.models_dir, workers=plan.args.workers,
                         policy=name, extra_args=plan.stack_args())  # fmt: skip
    try:
        stacks.enter_context(stack)
    except (RuntimeError, TimeoutError) as exc:
        console.print(f"  {name}: the stack did not start: {exc}")
        return Target(name, home=home, error=str(exc))
    return Target(name, stack.url, stack.nats_url, stack.subjects, stack=stack, home=home)


async def sweep_side_by_side(
    plan: BenchPlan, targets: list[Target], console: Console, measure: Measure | None = None
) -> None:
    """Warm every target, then rate by rate (lowest first) measure each target still in its
    sweep, in an order rotated by one per rate. A target leaves its sweep after its first miss
    (goodput is settled; not with --sweep-all) and its stack is stopped."""
    measure = measure or measure_point
    for target in targets:
        target.warm_up_failures = await warm_up(target.url, list(plan.specs), plan.vocab)
    for index, rate in enumerate(plan.rates):
        for target in rotated([t for t in targets if t.in_sweep], index):
            point = await measure(plan, target, rate)
            point["measured_order"] = sum(len(t.points) for t in targets)
            target.points.append(point)
            _print_point(console, target.name, rate, point)
            if point["attainment"] < ATTAINMENT_TARGET and not plan.args.sweep_all:
                target.in_sweep = False
                if target.stack is not None:
                    await asyncio.to_thread(target.stack.stop)


def _print_point(console: Console, name: str, rate: float, point: dict) -> None:
    views = "  ".join(f"{key} {point[key]:.0%}" for key in
                      ("attainment", "time_fraction_attainment", "artifact_qos") if key in point)  # fmt: skip
    console.print(f"  {name} λ={rate:g}: {views} ({point['finished']}/{point['requests']} "
                  f"finished) {dict(point['errors']) or ''}")  # fmt: skip


async def measure_point(plan: BenchPlan, target: Target, rate: float) -> dict:
    """Replay ``rate``'s trace against ``target``: attainment in every view, latencies, errors,
    and (where its NATS is known) the workers' switches and turns during the replay."""
    assert plan.slo is not None
    switches: list[SwitchDone] = []
    turns: list[TurnDone] = []
    received: list[float] = []  # when each of ``turns`` reached the benchmark

    def keep(event: object) -> None:
        if isinstance(event, SwitchDone):
            switches.append(event)
        elif isinstance(event, TurnDone):
            turns.append(event)
            received.append(time.monotonic())

    run = await _replay_watching(plan, target, rate, keep)
    point = {"rate_per_model": rate, "total_rate": rate * len(plan.specs),
             **summarize(run.records, plan.slo), "errors": dict(run.errors),
             "wall_s": run.wall_s, "records": run.records}  # fmt: skip
    if target.nats_url:
        point["switches"] = switch_summary(switches)
        point["turns"] = turns  # the simulator's per-step and per-turn price at this point
        point["turns_received_s"] = received
    if plan.classes and plan.max_wait_s is not None:
        point["by_class"] = by_class(run.records, plan.classes, plan.slo, plan.max_wait_s)
    return point


async def _replay_watching(
    plan: BenchPlan, target: Target, rate: float, keep: Callable[[Any], None]
) -> Replay:
    replay_args = {"vocab": plan.vocab, "seed": plan.args.seed, "drain_s": plan.args.drain,
                   "label": f"{target.name} λ={rate:g}"}  # fmt: skip
    if not target.nats_url:
        return await replay(target.url, plan.traces[rate], **replay_args)
    async with Watcher(target.nats_url, target.subjects.all_worker_events, WorkerEvent, keep):
        return await replay(target.url, plan.traces[rate], **replay_args)


def switch_summary(events: list[SwitchDone]) -> dict:
    """The workers' switches during one point: how many, bytes waited for, bytes prefetched (of
    which staged on an idle worker rather than behind another model's decode); and how many
    found their model wholly prefetched, partly (the turn waited for the rest of the copy) or
    not at all (another model was staged, or none)."""
    return {
        "count": len(events),
        "bytes": sum(e.bytes for e in events),
        "prefetched_bytes": sum(e.prefetched_bytes for e in events),
        "prefetched_idle_bytes": sum(e.prefetched_bytes for e in events if e.staged_while_idle),
        "wait_s": sum(e.seconds for e in events),
        "whole": sum(1 for e in events if e.prefetched_bytes and not e.bytes),
        "partial": sum(1 for e in events if e.prefetched_bytes and e.bytes),
        "none": sum(1 for e in events if e.bytes and not e.prefetched_bytes),
    }


def _result(plan: BenchPlan, target: Target) -> dict:
    """One policy's entry in the JSON."""
    if target.error is not None:
        result: dict = {"points": [], "error": target.error}
    else:
        result = {"points": target.points, "warm_up_failures": target.warm_up_failures}
    if target.home is not None and plan.slo is not None:  # a stack this command started
        result["stack_errors"] = stack_errors(target.home / "logs")
        result["scheduler_slo"] = {"ttft_s": plan.slo.ttft_s, "tbt_s": plan.slo.tbt_s}
    return result


def _highest_rate_records(result: dict) -> list[RequestRecord]:
    """Records of the highest rate measured (for the CDF plot)."""
    points = result["points"]
    return list(points[-1]["records"]) if points else []


def stack_errors(logs: Path, limit: int = 8) -> dict:
    """Error lines the services logged during the run (a benchmark must not hide them)."""
    counts: Counter = Counter()
    first: list[str] = []
    for log in sorted(logs.glob("*.log")) if logs.is_dir() else []:
        for line in log.read_text(errors="replace").splitlines():
            if ERROR_LINE.search(line):
                counts[log.stem] += 1
                if len(first) < limit:
                    first.append(f"{log.stem}: {line.strip()[:300]}")
    return {"counts": dict(counts), "first": first}


def strip_records(policies: dict[str, dict]) -> None:
    """Drop the raw records before writing JSON."""
    for res in policies.values():
        for point in res["points"]:
            point.pop("records", None)
            point.pop("turns", None)
            point.pop("turns_received_s", None)
