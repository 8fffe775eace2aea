"""Component reuse: a switch rebinds weights in the same arena and never rebuilds the engine."""

from __future__ import annotations

import pytest
from engine_helpers import GREEDY, PROMPTS, run_all


def test_switch_rebinds_the_same_runner_and_arena(make_engine):
    engine = make_engine()
    arena_ptr = engine.arena.buffer.data_ptr()
    engine.switch_to("demo-llama")
    runner = engine._native["llama"]
    engine.switch_to("demo-qwen2")
    engine.switch_to("demo-gpt2")
    engine.switch_to("demo-llama")
    assert engine._native["llama"] is runner
    assert engine.arena.buffer.data_ptr() == arena_ptr
    assert engine.resident_model == "demo-llama"


def test_prefetched_model_switches_in_without_copying(make_engine):
    engine = make_engine()
    engine.switch_to("demo-llama")
    engine.prefetch("demo-mistral")
    stats = engine.switch_to("demo-mistral")
    assert (stats.from_model, stats.to_model, stats.bytes) == ("demo-llama", "demo-mistral", 0)
    engine.add_request("r", "demo-mistral", PROMPTS[0], GREEDY)
    assert len(run_all(engine, ["r"])["r"]) == GREEDY.max_tokens


def test_stats_count_blocks_taken_and_returned(make_engine):
    engine = make_engine()
    engine.switch_to("demo-llama")
    total = engine.stats().kv_blocks_total
    engine.add_request("r", "demo-llama", list(range(1, 40)), GREEDY)
    engine.step(["r"])
    assert engine.stats().kv_blocks_free == total - 3  # 40 tokens of KV: 3 blocks of 16
    engine.abort("r")
    assert engine.stats().kv_blocks_free == total
    assert engine.request_ids() == []


def test_requests_of_a_model_that_is_not_resident_are_refused(make_engine):
    engine = make_engine()
    engine.switch_to("demo-llama")
    engine.add_request("r", "demo-qwen2", PROMPTS[0], GREEDY)
    with pytest.raises(ValueError, match="resident"):
        engine.step(["r"])


def test_a_pinned_model_stays_in_its_slot_through_other_models_switches(
    make_engine, references, device
):
    engine = make_engine()
    engine.pin("demo-llama")
    engine.switch_to("demo-llama")
    engine.prefetch("demo-qwen2")  # the free slot: prefetching still works beside it
    assert engine.switch_to("demo-qwen2").bytes == 0
    for other in ("demo-gpt2", "demo-mistral", "demo-qwen2"):
        engine.prefetch("demo-llama")  # a no-op: it holds its slot
        stats = engine.switch_to(other)
        assert stats.bytes > 0  # others switch through the slot the pinned model leaves
        assert "demo-llama" in engine.slots.models
    stats = engine.switch_to("demo-llama")
    assert stats.bytes == 0  # never copied again: a rebind
    engine.add_request("r", "demo-llama", PROMPTS[0], GREEDY)
    tokens = [out.token_id for out in run_all(engine, ["r"])["r"]]
    assert tokens == references("demo-llama", device)[0][0]  # its weights intact in the slot
