"""Fleets of nodes in the simulator: host weight caches, fetches over the network, and the
policies' locality-aware placement."""

from __future__ import annotations

import json
from argparse import Namespace

import pytest
from aegaeon.scheduler.estimators import Estimator, ModelProfile
from aegaeon.scheduler.policies import make_policy
from aegaeon.scheduler.policies.base import InstanceView, ModelSpec, RequestView, Slo, TurnPlan

from aegaeon.sim.engine import simulate
from aegaeon.sim.hardware import DEVICES, paper_models
from aegaeon.sim.instance import SimInstance, SimRequest
from aegaeon.sim.nodes import Fleet, NodeCache, NodeSetup
from aegaeon.sim.run import Deployment, run_deployment
from aegaeon.sim.study import roofline_estimator
from aegaeon.workload import TraceRequest, generate_trace

SLO = Slo(10.0, 0.1)
GiB = 1 << 30
MODELS = {m: ModelSpec(m, GiB, 1 << 20) for m in "AB"}


class Caches:
    """A locality hint: the (node, model) pairs cached; anything else takes 5 s to fetch."""

    def __init__(self, *cached: tuple[str, str]) -> None:
        self.cached = set(cached)

    def fetch_s(self, node: str, model: str) -> float:
        return 0.0 if (node, model) in self.cached else 5.0


def policy_on_two_nodes(name: str, hint: Caches | None, role: str = "both"):
    """``name`` over g0 (node n0) and g1 (node n1), otherwise equal."""
    policy = make_policy(name, dict(MODELS), SLO)
    policy.locality = hint
    for i in range(2):
        policy.add_instance(InstanceView(f"g{i}", role=role, node=f"n{i}"))  # type: ignore[arg-type]
    return policy


def placed(policy, model: str = "A") -> str | None:
    request = RequestView("r0", model, 10, 5, 0.0)
    assert policy.submit(request, 0.0) is None
    return request.instance_id


ROUTING = ("aegaeon", "request-level", "sllm-plus", "static-mux", "round-robin")


@pytest.mark.parametrize("name", ROUTING)
def test_each_policy_places_a_request_on_the_node_that_caches_its_model(name):
    assert placed(policy_on_two_nodes(name, Caches(("n1", "A")))) == "g1"
    assert placed(policy_on_two_nodes(name, None)) == "g0"  # no hint: as before, the first


def test_dedicated_binds_each_model_to_an_instance_on_a_node_that_caches_it():
    near = policy_on_two_nodes("dedicated", Caches(("n1", "A"), ("n0", "B")))
    assert placed(near) == "g1" and near.owner == {"A": "g1", "B": "g0"}
    blind = policy_on_two_nodes("dedicated", None)
    assert placed(blind) == "g0" and blind.owner == {"A": "g0", "B": "g1"}


def test_aegaeon_hands_a_prefilled_request_to_the_decode_node_that_caches_its_model():
    policy = make_policy("aegaeon", dict(MODELS), SLO)
    policy.locality = Caches(("n1", "A"))
    policy.add_instance(InstanceView("p0", role="prefill", node="n0"))
    policy.add_instance(InstanceView("d0", role="decode", node="n0"))
    policy.add_instance(InstanceView("d1", role="decode", node="n1"))
    placed(policy)
    plan = policy.next_turn("p0", 0.0)
    assert plan is not None and plan.handoff == {"r0": "d1"}


def test_sllm_plus_weighs_the_fetch_in_its_shortest_remaining_time_order():
    policy = make_policy("sllm-plus", dict(MODELS), SLO)
    policy.locality = Caches(("n0", "B"))
    policy.add_instance(InstanceView("g0", node="n0"))
    for rid, model in (("a", "A"), ("b", "B")):
        policy.submit(RequestView(rid, model, 10, 5, 0.0), 0.0)
    plan = policy.next_turn("g0", 0.0)
    assert plan is not None and plan.model == "B"  # equal work; B's weights are on the node


# ---------------------------------------------------------------- the cost of a fetch


def copy_cost() -> Estimator:
    """Switch = 0.05 s rebind + 1 s host → device copy (1 GiB at 1 GiB/s); prefill 50 ms."""
    profile = ModelProfile(prefill=(0.05, 0.0, 0.0), decode=(0.01, 0.0, 0.0), switch_fixed_s=0.05,
                           link_bytes_per_s=float(GiB), weight_bytes=GiB,
                           kv_bytes_per_token=0)  # fmt: skip
    return Estimator({"A": profile, "B": profile})


def on_node(node: NodeCache, name: str = "g0") -> SimInstance:
    return SimInstance(InstanceView(name), copy_cost(), control_s=0.0, node=node)


def turn(model: str) -> tuple[TurnPlan, dict[str, SimRequest]]:
    requests = {"r": SimRequest(TraceRequest("r", model, 0.0, 10, 1))}
    return TurnPlan("g0", model, ["r"], quota_s=1.0), requests


def test_an_uncached_switch_waits_for_the_fetch_to_the_node_then_the_copy():
    node = NodeCache(10 * GiB, GiB / 2)  # a fetch: 2 s
    first, second = on_node(node, "g0"), on_node(node, "g1")
    assert first.switch_cost("A", 0.0) == pytest.approx(0.05 + 2.0 + 1.0)
    # Another GPU of the node asking during the fetch waits for the same fetch.
    assert second.switch_cost("A", 0.5) == pytest.approx(0.05 + 1.5 + 1.0)
    assert node.fetches == 1 and first.fetch_wait_s == pytest.approx(2.0)
    node.warm("B", GiB)
    assert first.switch_cost("B", 10.0) == pytest.approx(0.05 + 1.0)  # cached: the copy only


def test_a_prefetch_of_an_uncached_model_copies_once_the_fetch_is_done():
    inst = on_node(NodeCache(10 * GiB, GiB / 2))
    inst.switch_cost("A", 0.0)
    inst.start_prefetch("B", 3.0)  # fetched 3 → 5, copied 5 → 6
    assert inst.switch_cost("B", 4.0) == pytest.approx(0.05 + 2.0)


def test_kv_handed_to_another_node_crosses_its_network_before_the_host_copy():
    profile = ModelProfile(prefill=(0.05, 0.0, 0.0), decode=(0.01, 0.0, 0.0), switch_fixed_s=0.0,
                           link_bytes_per_s=float(GiB), weight_bytes=GiB,
                           kv_bytes_per_token=GiB // 100)  # fmt: skip
    cost = Estimator({"A": profile})
    here, there = NodeCache(10 * GiB, GiB / 4), NodeCache(10 * GiB, GiB / 4)
    for node in (here, there):
        node.warm("A", GiB)
    prefill = SimInstance(InstanceView("p"), cost, control_s=0.0, node=here)
    local = SimInstance(InstanceView("d0"), cost, control_s=0.0, node=here)
    remote = SimInstance(InstanceView("d1"), cost, control_s=0.0, node=there)
    requests = {r: SimRequest(TraceRequest(r, "A", 0.0, 10, 4)) for r in ("near", "far")}
    for r in requests:  # 10 prompt tokens: 0.1 GiB of KV each
        plan = TurnPlan("p", "A", [r], quota_s=0.0, prefill_only=True, handoff={r: "d"})
        prefill.execute(plan, requests, 0.0)
    decode = {"near": local, "far": remote}
    for instance in decode.values():
        instance.switch_cost("A", 0.0)  # resident: the turn pays only for the KV
    moved = {r: decode[r]._swap_in("A", [requests[r]], 5.0) for r in decode}
    host_copy = 11 * (GiB // 100) / GiB  # prompt + the first token, over the host link
    assert moved["near"] == pytest.approx(host_copy)
    assert moved["far"] == pytest.approx(11 * (GiB // 100) / (GiB / 4) + host_copy)


def test_the_simulation_counts_the_fetch_in_the_first_tokens_time():
    trace = [TraceRequest("r0", "A", 0.0, 10, 1)]
    setup = NodeSetup(1, 0, GiB / 2)  # no room to cache anything: every switch fetches
    views = [InstanceView("g0", node="n0")]
    fleet = Fleet.of(views, {"A": GiB, "B": GiB}, setup)
    policy = make_policy("request-level", dict(MODELS), SLO)
    result = simulate(trace, policy, views, copy_cost(), SLO, fleet=fleet, control_s=0.0)
    assert result.records[0].token_times[0] == pytest.approx(0.05 + 2.0 + 1.0 + 0.05)
    assert result.fetches == {"fetches": 1, "fetched_gb": round(GiB / 1e9, 1)}
    assert policy.locality is fleet


def test_locality_off_gives_the_policy_no_hint_and_still_charges_the_fetch():
    trace = [TraceRequest("r0", "A", 0.0, 10, 1)]
    views = [InstanceView("g0", node="n0")]
    fleet = Fleet.of(views, {"A": GiB}, NodeSetup(1, 0, GiB / 2, locality=False))
    policy = make_policy("request-level", dict(MODELS), SLO)
    result = simulate(trace, policy, views, copy_cost(), SLO, fleet=fleet, control_s=0.0)
    assert policy.locality is None and result.fetch_wait_s == pytest.approx(2.0)


def test_caches_start_warm_with_the_models_dealt_over_the_nodes_and_evict_lru():
    fleet = Fleet(["n0", "n1", "n2"], {m: GiB for m in "ABCD"}, NodeSetup(8, 3 * GiB, GiB))
    held = {n: list(c.models) for n, c in fleet.nodes.items()}
    assert held == {"n0": ["A", "D", "C"], "n1": ["B", "A", "D"], "n2": ["C", "B", "A"]}
    cache = fleet.nodes["n0"]
    cache.ready_at("A", GiB, 0.0)  # used: now the most recent
    assert cache.ready_at("B", GiB, 0.0) == pytest.approx(1.0)
    assert list(cache.models) == ["C", "A", "B"]  # D, least recently used, made room
    assert fleet.fetch_s("n0", "D") == pytest.approx(1.0 + 1.0)  # behind B's fetch


# ---------------------------------------------------------------- no hint: as before


# Fingerprints of a fixed-seed run per policy taken before nodes existed: (turns, switches,
# end time, sum of every token time). With no node setup, the simulator must reproduce them.
# aegaeon's was retaken when the policy began to stage models on idle instances (a change of the
# policy alone: fewer switches, 1755 → 1717).
BEFORE = {
    "aegaeon": (2334, 1717, 164.258516, 8238975.976),
    "request-level": (1075, 256, 157.711639, 8060177.095),
    "sllm-plus": (1065, 263, 157.711639, 8049966.16),
    "static-mux": (937, 601, 161.235243, 8128269.444),
}


@pytest.mark.parametrize("policy", sorted(BEFORE))
def test_without_nodes_a_fixed_seed_run_is_what_it_was_before_them(policy):
    models = paper_models(24)
    trace = generate_trace(list(models), 0.1, 150, seed=3)
    cost = roofline_estimator(models, DEVICES["H800"])
    result = run_deployment(trace, policy, Deployment(8), models, DEVICES["H800"], cost, SLO)
    tokens = sum(sum(r.token_times) for r in result.records)
    turns, switches, end, total = BEFORE[policy]
    assert (result.turns, result.switches, round(result.end_time, 6)) == (turns, switches, end)
    assert round(tokens, 3) == total
    assert result.metrics["attainment"] == 1.0


def test_sim_command_reports_gpus_needed_with_and_without_locality(tmp_path):
    from aegaeon.sim import cli

    path = tmp_path / "fleet.json"
    args = Namespace(
        gpu="H800", profile=None, models=6, rate=0.05, policy=["aegaeon", "request-level"],
        slo_ttft=10.0, slo_tbt=0.1, duration=60.0, gpus=None, prefill=None,
        popularity="uniform", cv=1.0, sharegpt=None, seed=0, metric="attainment", paper=False,
        quick=False, json=str(path), nodes=2, gpus_per_node=2, host_cache_gb=30.0,
        network_gbs=20.0, locality="both", jobs=2,
    )  # fmt: skip
    assert cli.main(args) == 0
    out = json.loads(path.read_text())
    assert out["setting"]["nodes"]["fleet_gpus"] == 4
    for modes in out["policies"].values():
        assert set(modes) == {"locality", "no_locality"}
        for row in modes.values():
            assert row["runs"] >= 1 and "fetches" in row["fetches"]
            assert row["gpus"] is None or 1 <= row["gpus"] <= 4


def test_a_search_run_stops_once_the_target_is_out_of_reach_with_the_same_verdict():
    models = paper_models(12)
    trace = generate_trace(list(models), 0.1, 90, seed=4)
    cost = roofline_estimator(models, DEVICES["H800"])
    setup = NodeSetup(2, 100 * 10**9, 20e9)

    def run(gpus: int, stop: float | None):
        return run_deployment(trace, "request-level", Deployment(gpus), models, DEVICES["H800"],
                              cost, SLO, setup, stop)  # fmt: skip

    full, quick = run(2, None), run(2, 0.9)
    assert full.metrics["attainment"] < 0.9 and quick.stopped_early
    assert quick.metrics["attainment"] < 0.9 and quick.turns < full.turns
    full, quick = run(6, None), run(6, 0.9)  # passes: measured to the end, the same number
    assert not quick.stopped_early and quick.metrics["attainment"] == full.metrics["attainment"]
    assert full.metrics["attainment"] >= 0.9
