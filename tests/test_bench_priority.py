"""``bench serve`` with priority classes: the classes each model gets, what each class saw, and
the stack and the simulator told the same classes and maximum wait."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from aegaeon.scheduler.policies.base import ModelSpec, Slo
from bench_serve_args import serve_args

from aegaeon.bench.serve_priority import by_class, classes_for, with_classes
from aegaeon.bench.serve_run import BenchPlan
from aegaeon.slo_metrics import RequestRecord


def test_classes_follow_the_model_order_and_the_last_one_repeats():
    assert classes_for(["a", "b", "c"], "high,low") == {"a": "high", "b": "low", "c": "low"}
    with pytest.raises(ValueError, match="low, normal, high"):
        classes_for(["a"], "urgent")
    specs = with_classes({"a": ModelSpec("a", 1, 2, 3)}, {"a": "high"})
    assert (specs["a"].priority, specs["a"].context_length) == ("high", 3)


def test_each_class_reports_attainment_and_first_tokens_within_the_maximum_wait():
    slo = Slo(ttft_s=1.0, tbt_s=0.5)
    records = [
        RequestRecord("h1", "H", 0.0, 2, [0.5, 0.9]),  # meets the SLO
        RequestRecord("l1", "L", 0.0, 2, [1.5, 1.9]),  # late first token, within the wait
        RequestRecord("l2", "L", 0.0, 2, [3.5, 3.9]),  # past the maximum wait
        RequestRecord("l3", "L", 0.0, 2, [], finished=False),  # no first token at all
    ]
    seen = by_class(records, {"H": "high", "L": "low"}, slo, max_wait_s=2.0)
    assert (seen["high"]["requests"], seen["high"]["attainment"]) == (1, 1.0)
    assert (seen["low"]["requests"], seen["low"]["attainment"]) == (3, 0.0)
    assert seen["low"]["within_max_wait"] == pytest.approx(1 / 3)
    assert seen["low"]["max_first_token_wait_s"] == pytest.approx(3.5)


def test_the_priority_trace_gives_the_stack_and_the_simulator_the_classes_and_the_wait(
    tmp_path: Path,
):
    from aegaeon.bench.serve_models import write_bench_models

    models = tmp_path / "models"
    first, second = write_bench_models(models, 2)
    args = serve_args("--models-dir", str(models), "--models", "2", "--priority-trace")
    assert (args.popularity, args.sweep_all) == ("zipf", True)
    plan = BenchPlan.build(args, tmp_path)
    assert plan.classes == {first: "high", second: "low"}
    assert [s.priority for s in plan.specs.values()] == ["high", "low"]
    # The model-store reads each class from the models directory's lifecycle book.
    marks = json.loads((models / ".aegaeon-lifecycle.json").read_text())
    assert {n: m["priority"] for n, m in marks.items()} == plan.classes
    plan.slo = Slo(0.5, 0.01)
    extra = plan.stack_args()
    assert extra[extra.index("--max-wait") + 1] == "1.0"  # 2 TTFT SLOs
