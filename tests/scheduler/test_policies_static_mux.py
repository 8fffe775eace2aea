"""static-mux (MuxServe) without a device: rate- and size-aware placement, time-slicing."""

from __future__ import annotations

from aegaeon.scheduler.policies.base import InstanceView, ModelSpec, RequestView, Slo, TurnResult
from aegaeon.scheduler.policies.static_mux import REPLACE_PER_MODEL, StaticMuxPolicy, place

SLO = Slo(10.0, 0.1)
GB = 1 << 30


def models(**sizes_gb: float) -> dict[str, ModelSpec]:
    return {n: ModelSpec(n, int(s * GB), kv_bytes_per_token=1024) for n, s in sizes_gb.items()}


def request(rid: str, model: str, arrival: float = 0.0) -> RequestView:
    return RequestView(rid, model, prompt_len=10, max_tokens=20, arrival=arrival)


def mux(count: int, budget_gb: float, rates=None, **sizes_gb: float) -> StaticMuxPolicy:
    policy = StaticMuxPolicy(models(**sizes_gb), SLO, rates=rates)
    for i in range(count):
        policy.add_instance(InstanceView(f"i{i}", weight_budget_bytes=int(budget_gb * GB)))
    return policy


def test_placement_spreads_the_busiest_models_over_different_instances():
    owner = place({"A": 10, "B": 8, "C": 1, "D": 1}, dict.fromkeys("ABCD", 1), ["i0", "i1"],
                  {"i0": 2, "i1": 2})  # fmt: skip
    assert owner["A"] != owner["B"]


def test_placement_co_locates_the_quiet_models_within_the_weight_budget():
    sizes = dict.fromkeys("ABCD", 1)
    owner = place({"A": 10, "B": 8, "C": 1, "D": 1}, sizes, ["i0", "i1"], {"i0": 2, "i1": 2})
    for instance in ("i0", "i1"):
        assert sum(sizes[m] for m, i in owner.items() if i == instance) <= 2
    assert owner["C"] != owner["D"]  # each fills the room beside one busy model


def test_placement_weighs_rate_by_size():
    # B is half as busy but three times as big: more work per second than A.
    owner = place({"A": 2, "B": 1, "C": 1}, {"A": 1, "B": 3, "C": 1}, ["i0", "i1"],
                  {"i0": 10, "i1": 10})  # fmt: skip
    assert owner["C"] == owner["A"] != owner["B"]


def test_a_model_that_fits_nowhere_has_no_placement_and_its_requests_are_refused():
    """As MuxServe: "cannot find a placement" once the models outgrow the devices' memory."""
    owner = place({"A": 5, "B": 4, "C": 1}, {"A": 2, "B": 1, "C": 2}, ["i0", "i1"],
                  {"i0": 2, "i1": 2})  # fmt: skip
    assert set(owner) == {"A", "B"}
    policy = mux(1, 2, rates={"A": 5, "B": 4, "C": 1}, A=1, B=1, C=1)
    refused = policy.submit(request("r1", "C"), 0.0)
    assert refused is not None and refused.status == 503 and "no placement" in refused.reason
    assert policy.submit(request("r2", "A"), 0.0) is None


def test_with_overflow_swap_a_model_that_fits_nowhere_goes_where_it_overflows_least():
    owner = place({"A": 5, "B": 4, "C": 1}, {"A": 2, "B": 1, "C": 2}, ["i0", "i1"],
                  {"i0": 2, "i1": 2}, overflow=True)  # fmt: skip
    assert owner["C"] == owner["B"]  # 1 GB over there, 2 GB beside A: it switches within its set
    policy = StaticMuxPolicy(models(A=1, B=1, C=1), SLO, overflow="swap")
    policy.add_instance(InstanceView("i0", weight_budget_bytes=2 * GB))
    assert policy.submit(request("r1", "C"), 0.0) is None


def test_static_mux_uses_the_rates_it_is_given():
    policy = mux(2, 2, rates={"A": 10, "B": 8, "C": 1, "D": 1}, A=1, B=1, C=1, D=1)
    assert policy.owner["A"] != policy.owner["B"]


def test_static_mux_serves_a_model_only_on_its_own_instance():
    policy = mux(2, 4, A=2, B=2, C=2, D=2)
    for k, model in enumerate("ABCD" * 2):
        policy.submit(request(f"r{k}", model), 0.0)
        assert policy.requests[f"r{k}"].instance_id == policy.owner[model]


def test_static_mux_never_switches_outside_its_set():
    policy = mux(2, 2, rates={"A": 10, "B": 8, "C": 1, "D": 1}, A=1, B=1, C=1, D=1)
    for k, model in enumerate("ABCD" * 3):
        policy.submit(request(f"r{k}", model), 0.0)
    for instance in ("i0", "i1"):
        own = {m for m, i in policy.owner.items() if i == instance}
        for k in range(6):
            plan = policy.next_turn(instance, float(k))
            assert plan is not None and plan.model in own
            done = TurnResult(steps=1, elapsed_s=0.1, generated=dict.fromkeys(plan.request_ids, 2))
            policy.turn_done(instance, plan, done, float(k))


def test_static_mux_time_slices_among_the_models_of_its_set():
    policy = mux(1, 4, A=1, B=1)
    policy.submit(request("a0", "A"), 0.0)
    policy.submit(request("b0", "B"), 0.0)
    seen = []
    for k in range(4):
        plan = policy.next_turn("i0", float(k))
        assert plan is not None
        seen.append(plan.model)
        done = TurnResult(steps=1, elapsed_s=0.1, generated=dict.fromkeys(plan.request_ids, 2))
        policy.turn_done("i0", plan, done, float(k))
    assert seen == ["A", "B", "A", "B"]


def test_static_mux_learns_rates_from_arrivals_and_moves_only_drained_models():
    policy = mux(2, 2, A=1, B=1, C=1, D=1)  # equal rates at first
    first = dict(policy.owner)
    busy = next(m for m in "ABCD" if first[m] == first["A"] and m != "A")  # A's neighbour
    policy.submit(request("keep", busy), 0.0)  # outstanding: must not move
    for k in range(REPLACE_PER_MODEL * 4):
        policy.submit(request(f"a{k}", "A"), 0.0)
        policy.cancel(f"a{k}")  # done: A has nothing outstanding
    assert policy.requests["keep"].instance_id == first[busy]
    assert policy.owner[busy] == first[busy]
    assert policy.target[busy] != policy.target["A"]  # the new placement spreads A's load


def test_cancel_removes_a_request_from_its_instance_queue():
    policy = mux(1, 4, A=1)
    policy.submit(request("a0", "A"), 0.0)
    policy.cancel("a0")
    assert policy.next_turn("i0", 0.0) is None
