"""``bench serve`` measures the policies side by side: rate by rate, every policy still in its
sweep in turn, the order rotated per rate, a policy out after its first miss — the order with
a measuring function of the test's own, then for real on two stacks started together."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from aegaeon.scheduler.policies.base import Slo
from bench_serve_args import serve_args
from rich.console import Console

from aegaeon.bench import serve
from aegaeon.bench.serve_run import BenchPlan
from aegaeon.bench.serve_sweep import Measure, Target, rotated, sweep_side_by_side


def test_rotated_starts_each_rate_one_further_along() -> None:
    names = ["a", "b", "c"]
    assert [rotated(names, i) for i in range(4)] == [
        ["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]
    ]  # fmt: skip
    assert rotated([], 2) == []


def _measured_in_order(bench_models: Path, tmp_path: Path, *extra: str) -> tuple[list, dict]:
    """Three policies over three rates with a measuring function that passes aegaeon
    everywhere, request-level at the first rate only and static-mux nowhere; returns the
    order of the calls and the targets' points."""
    args = serve_args("--models-dir", str(bench_models), "--models", "2",
                      "--rates", "0.1,0.2,0.4", *extra)  # fmt: skip
    plan = BenchPlan.build(args, tmp_path)
    plan.slo = Slo(1.0, 0.05)
    passes = {"aegaeon": 9, "request-level": 1, "static-mux": 0}  # rates passed, from the lowest
    calls: list[tuple[str, float]] = []

    async def measure(plan: BenchPlan, target: Target, rate: float) -> dict:
        calls.append((target.name, rate))
        passed = plan.rates.index(rate) < passes[target.name]
        return {"attainment": 1.0 if passed else 0.5, "finished": 1, "requests": 1, "errors": {}}

    targets = [Target(name) for name in passes]
    asyncio.run(_without_warm_up(plan, targets, measure))
    return calls, {t.name: t.points for t in targets}


async def _without_warm_up(plan: BenchPlan, targets: list[Target], measure: Measure) -> None:
    plan.specs = {}  # warm-up sends one request per model: none here
    await sweep_side_by_side(plan, targets, Console(quiet=True), measure)


def test_each_rate_measures_every_policy_still_in_its_sweep_in_a_rotated_order(
    bench_models: Path, tmp_path: Path
) -> None:
    calls, points = _measured_in_order(bench_models, tmp_path)
    assert calls == [
        ("aegaeon", 0.1), ("request-level", 0.1), ("static-mux", 0.1),  # static-mux misses
        ("request-level", 0.2), ("aegaeon", 0.2),  # one further along; request-level misses
        ("aegaeon", 0.4),
    ]  # fmt: skip
    # Each point says when it was measured among all the run's points.
    assert [p["measured_order"] for p in points["aegaeon"]] == [0, 4, 5]
    assert [p["measured_order"] for p in points["request-level"]] == [1, 3]
    assert [p["measured_order"] for p in points["static-mux"]] == [2]


def test_sweep_all_keeps_every_policy_at_every_rate(bench_models: Path, tmp_path: Path) -> None:
    calls, _ = _measured_in_order(bench_models, tmp_path, "--sweep-all")
    assert [name for name, rate in calls if rate == 0.2] == ["request-level", "static-mux", "aegaeon"]  # fmt: skip
    assert [name for name, rate in calls if rate == 0.4] == ["static-mux", "aegaeon", "request-level"]  # fmt: skip


def test_two_policies_on_their_own_stacks_are_measured_side_by_side(
    bench_models: Path, tmp_path: Path
) -> None:
    out = tmp_path / "serve.json"
    args = serve_args(
        "--models-dir", str(bench_models), "--policies", "aegaeon,request-level",
        "--models", "2", "--rates", "1.0,2.0", "--duration", "2", "--min-requests", "4",
        "--drain", "30", "--sweep-all", "--slo-ttft", "30", "--slo-tbt", "5", "--no-sim",
        "--json", str(out),
    )  # fmt: skip
    assert serve.main(args) == 0
    result = json.loads(out.read_text())
    order = {}
    for name in ("aegaeon", "request-level"):
        res = result["policies"][name]
        assert res["scheduler_slo"] == {"ttft_s": 30.0, "tbt_s": 5.0}
        assert not res["warm_up_failures"]
        for point in res["points"]:
            assert point["finished"] == point["requests"] >= 4, point["errors"]
            order[(name, point["rate_per_model"])] = point["measured_order"]
    assert order == {("aegaeon", 1.0): 0, ("request-level", 1.0): 1,
                     ("request-level", 2.0): 2, ("aegaeon", 2.0): 3}  # fmt: skip
