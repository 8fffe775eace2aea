"""The simulator: the event loop driving the policies, the GPU search over layouts, the paper study,
the CLI (one turn's execution on an instance: test_sim_instance.py)."""

from __future__ import annotations

import json
from argparse import Namespace

import pytest
from aegaeon.scheduler.estimators import Estimator
from aegaeon.scheduler.policies.base import InstanceView, ModelSpec, Slo
from test_sim_instance import copy_cost

from aegaeon.sim.engine import simulate
from aegaeon.sim.hardware import DEVICES, paper_models
from aegaeon.sim.layout import instance_views
from aegaeon.sim.run import POLICIES, Deployment, best_at, fewest_gpus, run_deployment
from aegaeon.sim.study import ALL_POLICIES, Setting, gpus_needed, roofline_estimator
from aegaeon.workload import TraceRequest, generate_trace

SLO = Slo(10.0, 0.1)


class ObservingEstimator(Estimator):
    """A cost model that records what the simulator tells it after each switching turn."""

    def __init__(self, profiles):
        super().__init__(profiles)
        self.seen = []

    def observe_switch(self, model, exposed_s, copied_bytes, prefetched_bytes):
        self.seen.append((model, exposed_s, copied_bytes, prefetched_bytes))


def test_the_simulator_reports_each_switch_to_the_policys_estimator():
    cost = ObservingEstimator(copy_cost().profiles)
    trace = [TraceRequest("r0", "A", 0.0, 10, 3), TraceRequest("r1", "B", 0.0, 10, 3),
             TraceRequest("r2", "A", 30.0, 10, 3)]  # fmt: skip
    policy = POLICIES["request-level"]({m: ModelSpec(m, 1 << 30, 1 << 20) for m in "AB"},
                                       SLO, cost)  # fmt: skip
    result = simulate(trace, policy, [InstanceView("g0")], cost, SLO, control_s=0.0)
    assert [m for m, *_ in cost.seen] == ["A", "B", "A"] and result.switches == 3
    assert cost.seen[0] == ("A", pytest.approx(1.05), 1 << 30, 0)
    assert cost.seen[2] == ("A", pytest.approx(0.05), 0, 0)  # still in the other slot


def test_a_request_arriving_mid_turn_has_its_model_copied_before_its_switch():
    """The driver asks the policy to restage a busy instance after each event: B's request
    arrives while A decodes a long turn, so B's copy overlaps that turn."""
    cost = ObservingEstimator(copy_cost().profiles)
    trace = [TraceRequest("r0", "A", 0.0, 10, 2000), TraceRequest("r1", "B", 2.0, 10, 3)]
    policy = POLICIES["aegaeon"]({m: ModelSpec(m, 1 << 30, 0) for m in "AB"}, SLO, cost)
    result = simulate(trace, policy, [InstanceView("g0")], cost, SLO, control_s=0.0)
    assert result.metrics["finished"] == 2
    to_b = [seen for seen in cost.seen if seen[0] == "B"]
    assert to_b and to_b[0][3] > 0, cost.seen  # bytes copied in the background


def test_an_instance_left_idle_stages_the_model_asked_for_most_that_it_lacks():
    """C asked twice, then A, then B: once B's turns end (holding B and A), the idle instance
    copies C over A, so C's next request finds its weights in a slot (all bytes prefetched)."""
    cost = ObservingEstimator(copy_cost().profiles)
    arrivals = [("C", 0.0), ("C", 10.0), ("A", 20.0), ("B", 30.0), ("C", 40.0)]
    trace = [TraceRequest(f"r{i}", m, t, 10, 3) for i, (m, t) in enumerate(arrivals)]
    policy = POLICIES["aegaeon"]({m: ModelSpec(m, 1 << 30, 0) for m in "ABC"}, SLO, cost)
    result = simulate(trace, policy, [InstanceView("g0")], cost, SLO, control_s=0.0)
    assert result.metrics["finished"] == 5
    assert [m for m, *_ in cost.seen] == ["C", "A", "B", "C"]
    assert cost.seen[-1] == ("C", pytest.approx(0.05), 0, 1 << 30)


def test_the_policys_estimator_learns_the_turns_round_trip_and_step_times_as_live():
    cost = copy_cost()
    policy_est = roofline_estimator({m: ModelSpec(m, 1 << 30, 1 << 20) for m in "AB"},
                                    DEVICES["H100"])  # fmt: skip
    trace = [TraceRequest("r0", "A", 0.0, 10, 400), TraceRequest("r1", "B", 0.0, 10, 400)]
    policy = POLICIES["aegaeon"]({m: ModelSpec(m, 1 << 30, 1 << 20) for m in "AB"}, SLO, policy_est)
    simulate(trace, policy, [InstanceView("g0")], cost, SLO, control_s=0.003)
    assert policy_est.turn_overhead_s() == pytest.approx(0.003, rel=0.01)  # from its prior
    assert policy_est.decode_time("A", [30]) == pytest.approx(cost.decode_time("A", [30]), rel=0.05)


@pytest.mark.parametrize("policy", sorted(ALL_POLICIES))
def test_every_policy_serves_a_light_trace_within_slo(policy):
    models = paper_models(4)
    trace = generate_trace(list(models), 0.05, 120, seed=3)
    cost = roofline_estimator(models, DEVICES["H800"])
    layout = Deployment(4, 1 if policy == "aegaeon" else 0)
    result = run_deployment(trace, policy, layout, models, DEVICES["H800"], cost, SLO)
    assert result.metrics["finished"] == len(trace)
    assert result.metrics["attainment"] >= 0.9


def test_dedicated_with_too_few_gpus_rejects_the_orphans():
    models = paper_models(4)
    trace = generate_trace(list(models), 0.05, 60, seed=3)
    cost = roofline_estimator(models, DEVICES["H800"])
    result = run_deployment(trace, "dedicated", Deployment(2), models, DEVICES["H800"], cost, SLO)
    assert result.rejected > 0
    assert result.metrics["finished"] == len(trace) - result.rejected


def test_the_engine_drives_a_both_instance_through_prefill_and_decode():
    models = paper_models(2)
    cost = roofline_estimator(models, DEVICES["H100"])
    trace = generate_trace(list(models), 0.2, 60, seed=5)
    policy = POLICIES["aegaeon"](dict(models), SLO, cost)
    result = simulate(trace, policy, [InstanceView("g0")], cost, SLO)
    assert result.metrics["finished"] == len(trace)
    assert result.last_alpha is not None and result.switches >= 2


def test_fewest_gpus_bisects_to_the_threshold():
    calls = []

    class Fake:
        def __init__(self, ok):
            self.metrics = {"attainment": 1.0 if ok else 0.5}

    def run(deployment):
        calls.append(deployment.gpus)
        return Fake(deployment.gpus >= 7)

    needed = fewest_gpus("static-mux", run, 1, 40, guess=8)
    assert needed.gpus == 7
    assert len(set(calls)) <= 7


def test_fewest_gpus_says_none_when_even_the_most_fail():
    class Fake:
        def __init__(self):
            self.metrics = {"attainment": 0.0}

    assert fewest_gpus("static-mux", lambda d: Fake(), 1, 8).gpus is None


def test_aegaeon_needs_fewer_gpus_than_dedicated_on_a_cold_fleet():
    models = paper_models(10)
    setting = Setting(10, 0.05, SLO, DEVICES["H800"], duration=200, seed=1)
    trace = generate_trace(list(models), setting.rate, setting.duration, seed=1)
    cost = roofline_estimator(models, setting.device)
    out = gpus_needed(trace, models, cost, setting, ("aegaeon", "dedicated"))
    assert out["dedicated"]["gpus"] == 10
    assert out["aegaeon"]["gpus"] is not None and out["aegaeon"]["gpus"] <= 5


def test_sim_command_writes_json_for_a_fixed_gpu_count(tmp_path):
    from aegaeon.sim import cli

    path = tmp_path / "out.json"
    args = Namespace(
        gpu="H800", profile=None, models=4, rate=0.05, policy=["aegaeon", "static-mux"],
        slo_ttft=10.0, slo_tbt=0.1, duration=60.0, gpus=2, prefill=1, popularity="uniform",
        cv=1.0, sharegpt=None, seed=0, metric="attainment", paper=False, quick=False,
        json=str(path),
    )  # fmt: skip
    assert cli.main(args) == 0
    out = json.loads(path.read_text())
    assert set(out["policies"]) == {"aegaeon", "static-mux"}
    assert out["policies"]["aegaeon"]["metrics"]["requests"] == out["setting"]["requests"]
    # The pinned layout where the policy has roles; all-both where it has none.
    assert out["policies"]["aegaeon"]["layout"]["name"] == "1 prefill + 1 decode"
    assert out["policies"]["static-mux"]["layout"]["name"] == "2 both"


def test_simulate_policy_runs_on_instances_the_caller_describes():
    from aegaeon.scheduler.policies.base import ModelSpec

    from aegaeon.sim.run import simulate_policy
    from aegaeon.workload import SHAREGPT

    # Demo-sized models on the CPU roofline, with short requests.
    models = {f"d{i}": ModelSpec(f"d{i}", 50 << 20, 4096) for i in range(3)}
    cost = roofline_estimator(models, DEVICES["cpu"])
    lengths = SHAREGPT.scaled(0.05, max_input=64, max_output=32)
    trace = generate_trace(list(models), 0.05, 100, lengths=lengths, seed=2)
    views = [InstanceView("w0", weight_budget_bytes=max(m.weight_bytes for m in models.values()))]
    result = simulate_policy(trace, "request-level", views, models, cost, Slo(600.0, 5.0))
    assert result.metrics["finished"] == len(trace)
    assert result.switches >= 2  # one model resident at a time


def test_every_policy_is_offered_the_same_layouts_including_three_prefill_to_five_decode():
    from aegaeon.sim.layout import candidates, has_roles, layouts_for

    offered = candidates(16)
    assert Deployment(16) in offered and Deployment(16, 6) in offered  # 3 : 5 on each node
    views = instance_views(Deployment(16, 6), DEVICES["H800"], paper_models(16), "aegaeon")
    roles = [v.role for v in views]
    assert roles[:8].count("prefill") == 3 and roles[8:].count("prefill") == 3
    for policy in POLICIES:
        runs = layouts_for(policy, 16)
        # A policy with roles runs every candidate; one without runs each as all-both.
        assert runs == (offered if has_roles(policy) else [Deployment(16)])


def test_the_gpu_search_tries_every_offered_layout_at_each_count():
    from aegaeon.sim.layout import candidates

    tried = []

    class Fake:
        def __init__(self):
            self.metrics = {"attainment": 0.5}

    def run(deployment):
        tried.append(deployment)
        return Fake()

    best_at(16, "aegaeon", run, "attainment")
    assert tried == candidates(16)


def test_the_gpu_search_reports_the_layout_and_the_three_views():
    models = paper_models(6)
    setting = Setting(6, 0.05, SLO, DEVICES["H800"], duration=60, seed=1)
    trace = generate_trace(list(models), setting.rate, setting.duration, seed=1)
    cost = roofline_estimator(models, setting.device)
    out = gpus_needed(trace, models, cost, setting, ("aegaeon", "request-level"))
    for row in out.values():
        assert row["layout"]["gpus"] == row["gpus"] and row["layout"]["name"]
        assert {"attainment", "time_fraction_attainment", "artifact_qos"} <= set(row)


def test_paper_study_writes_the_figures_with_three_views_and_a_layout_per_result():
    from aegaeon.sim.paper import PaperGrid, paper_study

    grid = PaperGrid(gpus=2, counts={0.1: (2, 4)}, slo_scales=(1.0,),
                     duration_s={0.1: 60.0}, headline_models=4)  # fmt: skip
    out = paper_study(DEVICES["H800"], grid, ("aegaeon", "request-level", "static-mux",
                                              "dedicated"))  # fmt: skip
    assert len(out["points"]) == 2
    for point in out["points"]:
        for row in point["policies"].values():
            for view in ("attainment", "time_fraction_attainment", "artifact_qos"):
                assert 0.0 <= row[view]["value"] <= 1.0 and row[view]["layout"]
    assert {"models_at_90_vs_static_mux", "models_at_90_vs_static_mux_strict",
            "models_at_90_vs_sllm_plus", "gpus_vs_dedicated"} <= set(out)  # fmt: skip
    assert out["models_at_90"]["aegaeon"]["artifact_qos"] == 4  # light load: both counts pass
    head = out["gpus_needed_at_80"]["policies"]
    assert head["dedicated"]["gpus"] == 4 and head["aegaeon"]["layout"]["name"]
    assert out["gpus_vs_dedicated"] == head["aegaeon"]["gpus"] / 4


def test_what_a_policy_learns_in_one_run_stays_in_that_run():
    cost = ObservingEstimator(copy_cost().profiles)
    models = {m: ModelSpec(m, 1 << 30, 1 << 20) for m in "AB"}
    trace = [TraceRequest("r0", "A", 0.0, 10, 3), TraceRequest("r1", "B", 0.0, 10, 3)]
    from aegaeon.sim.run import simulate_policy

    simulate_policy(trace, "request-level", [InstanceView("g0")], models, cost, SLO)
    assert cost.seen == []  # the policy observed its own copy
