"""Unloading a removed model (``Engine.unload_model``, on the worker's EvictModel): its slot,
resident or prefetched, and its registration go; a model with requests held is kept; the same
name registered again serves as it did."""

from __future__ import annotations

import pytest
from engine_helpers import GREEDY, PROMPTS, run_all


def test_a_resident_model_is_unloaded_and_serves_the_same_once_registered_again(make_engine, demo_models_dir):  # fmt: skip
    engine = make_engine()
    engine.switch_to("demo-llama")
    engine.add_request("before", "demo-llama", PROMPTS[0], GREEDY)
    before = [o.token_id for o in run_all(engine, ["before"])["before"]]
    engine.unload_model("demo-llama")
    assert engine.resident_model is None and "demo-llama" not in engine.specs
    assert engine.weights_loaded("demo-llama") == (0, 0)
    with pytest.raises(KeyError, match="not registered"):
        engine.switch_to("demo-llama")
    engine.register_model("demo-llama", demo_models_dir / "demo-llama")
    engine.switch_to("demo-llama")
    engine.add_request("after", "demo-llama", PROMPTS[0], GREEDY)
    assert [o.token_id for o in run_all(engine, ["after"])["after"]] == before


def test_a_prefetched_model_is_unloaded_and_the_resident_one_keeps_serving(make_engine):
    engine = make_engine()
    engine.switch_to("demo-llama")
    engine.prefetch("demo-qwen2")
    engine.unload_model("demo-qwen2")
    assert "demo-qwen2" not in engine.slots.models and engine.resident_model == "demo-llama"
    engine.add_request("r", "demo-llama", PROMPTS[1], GREEDY)
    assert len(run_all(engine, ["r"])["r"]) == GREEDY.max_tokens


def test_a_model_whose_requests_are_held_is_not_unloaded(make_engine):
    engine = make_engine()
    engine.switch_to("demo-llama")
    engine.add_request("r", "demo-llama", PROMPTS[0], GREEDY)
    with pytest.raises(ValueError, match="still has 1 requests"):
        engine.unload_model("demo-llama")
    assert engine.resident_model == "demo-llama" and "demo-llama" in engine.specs
