"""Live prefetch: the next model's weights are copied into the free slot while the resident model
decodes, and neither model's tokens change (DESIGN.md §5). Asserts on the engine's byte counts,
never on the clock."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import GREEDY, PROMPTS, run_all

# Small chunks: the demo models' ~15 MB copy takes hundreds of chunks and runs across steps.
CHUNK = 64 << 10


def _decode(engine, model: str, tag: str) -> dict[str, list[int]]:
    ids = [f"{tag}/{i}" for i in range(len(PROMPTS))]
    for rid, prompt in zip(ids, PROMPTS, strict=True):
        engine.add_request(rid, model, prompt, GREEDY)
    return {rid: [o.token_id for o in outs] for rid, outs in run_all(engine, ids).items()}


def _expected(references, model: str, device: str, tag: str) -> dict[str, list[int]]:
    tokens, _ = references(model, device)
    return {f"{tag}/{i}": tokens[i] for i in range(len(PROMPTS))}


def test_prefetch_racing_decode_keeps_both_models_tokens_exact(make_engine, references, device):
    engine = make_engine(copy_chunk_bytes=CHUNK)
    engine.switch_to("demo-llama")
    engine.start_prefetch("demo-qwen2")  # copies while demo-llama decodes step after step
    assert engine.slots.prefetching == "demo-qwen2"
    assert _decode(engine, "demo-llama", "a") == _expected(references, "demo-llama", device, "a")
    stats = engine.switch_to("demo-qwen2")
    assert (stats.from_model, stats.to_model) == ("demo-llama", "demo-qwen2")
    assert stats.bytes + stats.prefetched_bytes == engine.specs["demo-qwen2"].weight_bytes
    assert _decode(engine, "demo-qwen2", "b") == _expected(references, "demo-qwen2", device, "b")


def test_switch_after_a_completed_prefetch_copies_nothing_while_waiting(make_engine):
    engine = make_engine(copy_chunk_bytes=CHUNK)
    engine.switch_to("demo-llama")
    engine.prefetch("demo-mistral")  # start and wait for the copy
    stats = engine.switch_to("demo-mistral")
    assert stats.bytes == 0
    assert stats.prefetched_bytes == engine.specs["demo-mistral"].weight_bytes


def test_switch_to_another_model_while_a_prefetch_is_in_flight_stays_exact(
    make_engine, references, device
):
    engine = make_engine(copy_chunk_bytes=CHUNK)
    engine.switch_to("demo-llama")
    engine.start_prefetch("demo-qwen2")
    stats = engine.switch_to("demo-mistral")  # abandons the qwen2 copy and takes its slot
    assert (stats.bytes, stats.prefetched_bytes) == (
        engine.specs["demo-mistral"].weight_bytes,
        0,
    )
    assert engine.slots.prefetching is None
    expected = _expected(references, "demo-mistral", device, "m")
    assert _decode(engine, "demo-mistral", "m") == expected
    back = engine.switch_to("demo-qwen2")  # the abandoned copy counts for nothing
    assert (back.bytes, back.prefetched_bytes) == (engine.specs["demo-qwen2"].weight_bytes, 0)
    assert _decode(engine, "demo-qwen2", "q") == _expected(references, "demo-qwen2", device, "q")


def test_a_newer_prefetch_replaces_one_in_flight_without_touching_the_resident_model(
    make_engine, references, device
):
    engine = make_engine(copy_chunk_bytes=CHUNK)
    engine.switch_to("demo-llama")
    engine.start_prefetch("demo-qwen2")
    engine.start_prefetch("demo-mistral")
    assert engine.slots.prefetching == "demo-mistral"
    assert _decode(engine, "demo-llama", "a") == _expected(references, "demo-llama", device, "a")
    stats = engine.switch_to("demo-mistral")
    assert stats.bytes + stats.prefetched_bytes == engine.specs["demo-mistral"].weight_bytes
    assert _decode(engine, "demo-mistral", "m") == _expected(
        references, "demo-mistral", device, "m"
    )


def test_prefetching_the_resident_model_does_nothing(make_engine):
    engine = make_engine()
    engine.switch_to("demo-llama")
    engine.start_prefetch("demo-llama")
    assert engine.slots.prefetching is None
    assert engine.switch_to("demo-llama").bytes == 0


def test_prefetch_of_an_unregistered_model_is_refused(make_engine):
    engine = make_engine()
    with pytest.raises(KeyError, match="not registered"):
        engine.start_prefetch("nope")


def test_host_weights_keep_the_mapped_base_address_for_unpinning(make_engine):
    engine = make_engine()
    engine.switch_to("demo-llama")
    host = engine.slots._host["demo-llama"]
    offset = engine.specs["demo-llama"].index.data_offset
    assert host.tensor.data_ptr() == host.mapping.data_ptr() + offset
    assert host.mapping.data_ptr() % 4096 == 0  # a page boundary: what cudaHostRegister got


def test_prefetch_converts_dtypes_in_the_background_and_keeps_bf16_tokens_bitwise(make_engine):
    # fp32 checkpoints served in bf16: the conversion is part of the background copy, and the
    # tokens equal those of the same engine switching without any prefetch.
    plain = make_engine(dtype="bfloat16")
    plain.switch_to("demo-llama")
    plain.switch_to("demo-qwen2")
    expected = _decode(plain, "demo-qwen2", "q")
    engine = make_engine(dtype="bfloat16", copy_chunk_bytes=CHUNK)
    engine.switch_to("demo-llama")
    engine.start_prefetch("demo-qwen2")
    engine.slots.finish_prefetch()
    stats = engine.switch_to("demo-qwen2")
    assert (stats.bytes, stats.prefetched_bytes) == (0, engine.specs["demo-qwen2"].weight_bytes)
    embed = engine._native["qwen2"].embed
    arena = engine.arena.buffer
    assert embed.dtype == torch.bfloat16
    assert arena.data_ptr() <= embed.data_ptr() < arena.data_ptr() + arena.numel()
    assert _decode(engine, "demo-qwen2", "q") == expected
