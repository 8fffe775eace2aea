"""The exactness rule (DESIGN.md §5): preemption, swapping, switching and recovery never change
a request's tokens, and the tokens equal transformers' greedy output for the same weights."""

from __future__ import annotations

import itertools

import pytest
import torch
from engine_helpers import GREEDY, MODELS, NATIVE, NEW_TOKENS, PROMPTS, decode_swapping, run_all


def _tokens(outs: list) -> list[int]:
    return [o.token_id for o in outs]


def _assert_matches_reference(
    outs: list, ref_tokens: list[int], ref_logprobs: torch.Tensor
) -> None:
    assert _tokens(outs) == ref_tokens
    for step, out in enumerate(outs):
        assert out.logprob == pytest.approx(float(ref_logprobs[step, out.token_id]), abs=1e-4)
        for token, value in out.top_logprobs:
            assert value == pytest.approx(float(ref_logprobs[step, token]), abs=1e-4)


@pytest.mark.parametrize("model", MODELS)
def test_batched_greedy_equals_transformers_generate(make_engine, references, device, model):
    engine = make_engine()
    engine.switch_to(model)
    ids = [f"r{i}" for i in range(len(PROMPTS))]
    for rid, prompt in zip(ids, PROMPTS, strict=True):
        engine.add_request(rid, model, prompt, GREEDY)
    got = run_all(engine, ids)
    ref_tokens, ref_logprobs = references(model, device)
    for i, rid in enumerate(ids):
        _assert_matches_reference(got[rid], ref_tokens[i], ref_logprobs[i])
        assert got[rid][-1].finish_reason == "length"
    assert engine.request_ids() == []


def test_requests_alone_and_batched_produce_identical_tokens(make_engine):
    engine = make_engine()
    engine.switch_to("demo-mistral")
    alone = []
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"a{i}", "demo-mistral", prompt, GREEDY)
        alone.append(_tokens(run_all(engine, [f"a{i}"])[f"a{i}"]))
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"b{i}", "demo-mistral", prompt, GREEDY)
    batched = run_all(engine, [f"b{i}" for i in range(len(PROMPTS))])
    assert [_tokens(batched[f"b{i}"]) for i in range(len(PROMPTS))] == alone


def test_switching_models_between_every_step_with_tiny_kv_keeps_tokens_exact(
    make_engine, references, device
):
    # 3 slabs of 256 KiB: one model's batch barely fits, so every switch swaps the other
    # models' KV out, steps preempt their newest request, and the small host pool forces drops.
    engine = make_engine(arena_bytes=(512 << 20) + (3 << 18), weight_budget_bytes=512 << 20,
                         slab_bytes=1 << 18, host_kv_bytes=1 << 20)  # fmt: skip
    ids = {m: [f"{m}/{i}" for i in range(len(PROMPTS))] for m in MODELS}
    for model in MODELS:
        for rid, prompt in zip(ids[model], PROMPTS, strict=True):
            engine.add_request(rid, model, prompt, GREEDY)
    got: dict[str, list] = {rid: [] for rid in itertools.chain(*ids.values())}
    for _ in range(NEW_TOKENS * 4):
        for model in MODELS:
            live = [rid for rid in ids[model] if rid in engine.request_ids()]
            if live:
                engine.switch_to(model)
                for out in engine.step(live):
                    got[out.request_id].append(out)
    assert engine.request_ids() == []
    for model in MODELS:
        ref_tokens, ref_logprobs = references(model, device)
        for i, rid in enumerate(ids[model]):
            _assert_matches_reference(got[rid], ref_tokens[i], ref_logprobs[i])
    counters = engine.counters
    assert counters["preempted"] and counters["swapped_in"] and counters["dropped"], counters


@pytest.mark.parametrize("model", NATIVE)
def test_swapped_kv_comes_back_bit_identical(make_engine, model):
    engine = make_engine()
    engine.switch_to(model)
    engine.add_request("r", model, PROMPTS[2], GREEDY)
    engine.step(["r"])
    request = engine._requests["r"]
    kv = engine._paged_kv(model)
    before = torch.stack([kv.region[o : o + kv.block_elems].clone() for o in request.blocks])
    assert engine.swap_out(["r"]) == []
    assert not request.blocks and request.host is not None
    kv.region.fill_(float("nan"))  # no stale copy on the device can pass for swapped-in KV
    engine.swap_in(["r"])
    after = torch.stack([kv.region[o : o + kv.block_elems] for o in request.blocks])
    assert torch.equal(before.view(torch.int32), after.view(torch.int32))


@pytest.mark.parametrize("model", MODELS)
def test_swap_or_drop_in_mid_decode_gives_bit_identical_logprobs(make_engine, model):
    # Same batch composition each step, so logprobs must match to the bit, not just tokens.
    reference_engine = make_engine()
    reference_engine.switch_to(model)
    reference_engine.add_request("r", model, PROMPTS[0], GREEDY)
    reference = run_all(reference_engine, ["r"])["r"]
    outs = decode_swapping(make_engine(host_kv_bytes=1 << 20), model, PROMPTS[0])
    assert [(o.token_id, o.logprob) for o in outs] == [(o.token_id, o.logprob) for o in reference]


@pytest.mark.parametrize("model", MODELS)
def test_dropped_kv_is_recomputed_with_identical_tokens(make_engine, references, device, model):
    engine = make_engine(host_kv_bytes=0)  # no host pool: every swap-out drops
    engine.switch_to(model)
    engine.add_request("r", model, PROMPTS[1], GREEDY)
    outs = []
    for step in range(NEW_TOKENS):
        if step % 4 == 2:
            assert engine.swap_out(["r"]) == ["r"]
        outs += engine.step(["r"])
    ref_tokens, ref_logprobs = references(model, device)
    _assert_matches_reference(outs, ref_tokens[1], ref_logprobs[1])


@pytest.mark.parametrize("model", MODELS)
def test_recovery_with_output_token_ids_continues_the_same_sequence(
    make_engine, references, device, model
):
    ref_tokens, _ = references(model, device)
    engine = make_engine()
    engine.switch_to(model)
    engine.add_request("r", model, PROMPTS[3], GREEDY, output_token_ids=ref_tokens[3][:5])
    outs = run_all(engine, ["r"])["r"]
    assert [o.index for o in outs] == list(range(5, NEW_TOKENS))
    assert _tokens(outs) == ref_tokens[3][5:]


def test_kv_pressure_preempts_the_newest_request_of_the_step(make_engine):
    engine = make_engine(arena_bytes=(512 << 20) + (4 << 18), weight_budget_bytes=512 << 20,
                         slab_bytes=1 << 18)  # fmt: skip
    engine.switch_to("demo-mistral")  # 2 blocks of 16 tokens per 256 KiB slab: 8 blocks
    for i in range(5):
        engine.add_request(f"r{i}", "demo-mistral", list(range(10, 35)), GREEDY)  # 2 blocks each
    outs = engine.step([f"r{i}" for i in range(5)])
    assert engine.last_step_preempted == ["r4"]
    assert sorted(o.request_id for o in outs) == ["r0", "r1", "r2", "r3"]


def test_kv_exported_by_one_engine_and_imported_by_another_decodes_identically(
    make_engine, references, device
):
    import msgspec
    from aegaeon.gpu_worker.engine import KVHandle

    prefill, decode = make_engine(), make_engine()
    prefill.switch_to("demo-qwen2")
    decode.switch_to("demo-qwen2")
    prefill.add_request("r", "demo-qwen2", PROMPTS[2], GREEDY)
    first = prefill.step(["r"])
    wire = msgspec.msgpack.encode(prefill.export_kv("r"))
    handle = msgspec.msgpack.decode(wire, type=KVHandle)
    decode.import_kv("r", "demo-qwen2", PROMPTS[2], GREEDY, [first[0].token_id], handle)
    prefill.abort("r")  # the importer copied the bytes: the exporter may free them now
    rest = run_all(decode, ["r"])["r"]
    ref_tokens, ref_logprobs = references("demo-qwen2", device)
    _assert_matches_reference(first + rest, ref_tokens[2], ref_logprobs[2])
    assert prefill.stats().host_kv_bytes_free == prefill.stats().host_kv_bytes_total
