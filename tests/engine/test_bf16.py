"""The bf16 exactness rule (DESIGN.md §5): a bf16 checkpoint is served in bf16 (nothing converted)
and a request's tokens are bitwise those of the same engine running it uninterrupted, whether
its KV was swapped out and back (how a preempted request waits), another model was switched in
between two of its steps, its KV was dropped and recomputed, or it was recovered elsewhere from
its tokens so far. Against transformers in bf16 only the greedy agreement rate is reported: two
implementations round differently, and in bf16 that can flip a near-tie.

Each request runs alone in both runs: bf16 matmuls on the CPU are not batch-invariant (the same
row in a batch of 4 and alone can round differently), so "the same batch" is part of
"uninterrupted"."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from aegaeon.gpu_worker.engine import Engine
from engine_helpers import GREEDY, MODELS, NEW_TOKENS, PROMPTS, decode_swapping, run_all

OTHER = "demo-llama"  # the model switched in between two steps (its own bf16 copy)


@pytest.fixture(scope="module")
def bf16_models(demo_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo models saved again as bf16 checkpoints (what a market mostly serves)."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("bf16")
    for name in MODELS:
        model = AutoModelForCausalLM.from_pretrained(demo_models_dir / name, dtype=torch.bfloat16)
        model.save_pretrained(out / name)
    return out


@pytest.fixture
def bf16_engine(bf16_models: Path, make_engine) -> Callable[..., Engine]:
    def build(**overrides: object) -> Engine:
        options: dict = {"dtype": "bfloat16", "arena_bytes": 256 << 20, "host_kv_bytes": 16 << 20}
        return make_engine(bf16_models, **(options | overrides))

    return build


def _alone(engine: Engine, model: str, prompt: list[int], **kwargs: object) -> list:
    engine.switch_to(model)
    engine.add_request("r", model, prompt, GREEDY, **kwargs)  # type: ignore[arg-type]
    return run_all(engine, ["r"])["r"]


def _pairs(outs: list) -> list[tuple[int, float]]:
    return [(o.token_id, o.logprob) for o in outs]


@pytest.mark.parametrize("model", MODELS)
def test_a_bf16_checkpoint_is_served_without_a_conversion(bf16_engine, model):
    engine = bf16_engine()
    stats = engine.switch_to(model)
    spec = engine.specs[model]
    assert stats.bytes == spec.weight_bytes  # the stored bytes only: no converted copy
    slot = engine.arena.slots[engine.slots._resident]  # type: ignore[index]
    views = engine.slots._views[engine.slots._resident]  # type: ignore[index]
    assert views is not None
    for tensor in views.values():
        assert tensor.dtype == torch.bfloat16
        assert slot.data_ptr() <= tensor.data_ptr() < slot.data_ptr() + spec.index.data_bytes


@pytest.mark.parametrize("model", MODELS)
def test_bf16_tokens_are_bitwise_the_same_through_swaps_switches_and_recompute(bf16_engine, model):
    for prompt in PROMPTS[:2]:
        reference = _alone(bf16_engine(), model, prompt)
        engine = bf16_engine()
        engine.switch_to(model)
        engine.add_request("r", model, prompt, GREEDY)
        outs = []
        for step in range(NEW_TOKENS):
            if step % 4 == 1:
                assert engine.swap_out(["r"]) == []  # to the host pool, back at the next step
                engine.arena.kv.fill_(float("nan"))  # it must come back from the host copy
            elif step % 4 == 2:
                engine.switch_to(OTHER if model != OTHER else "demo-qwen2")
                engine.switch_to(model)
            elif step % 4 == 3:
                engine.drop_kv("r")  # recomputed from the prompt and the tokens so far
            outs += engine.step(["r"])
        assert [o.token_id for o in outs] == [o.token_id for o in reference]
        assert engine.counters["swapped_out"] > 0 and engine.counters["dropped"] > 0


@pytest.mark.parametrize("model", MODELS)
def test_a_swapped_bf16_request_keeps_its_logprobs_to_the_bit(bf16_engine, model):
    reference = _alone(bf16_engine(), model, PROMPTS[0])
    assert _pairs(decode_swapping(bf16_engine(), model, PROMPTS[0])) == _pairs(reference)


@pytest.mark.parametrize("model", MODELS)
def test_a_bf16_request_recovered_from_its_tokens_continues_bitwise(bf16_engine, model):
    reference = [o.token_id for o in _alone(bf16_engine(), model, PROMPTS[3])]
    recovered = _alone(bf16_engine(), model, PROMPTS[3], output_token_ids=reference[:5])
    assert [o.token_id for o in recovered] == reference[5:]


def test_greedy_agreement_with_transformers_in_bf16_is_reported(
    bf16_engine, bf16_models, device, capsys
):
    from transformers import AutoModelForCausalLM

    engine = bf16_engine()
    agree = total = 0
    for name in MODELS:
        hf = AutoModelForCausalLM.from_pretrained(bf16_models / name, dtype=torch.bfloat16)
        hf = hf.to(device).eval()
        engine.switch_to(name)
        for i, prompt in enumerate(PROMPTS):
            engine.add_request(f"{name}{i}", name, prompt, GREEDY)
            ours = [o.token_id for o in run_all(engine, [f"{name}{i}"])[f"{name}{i}"]]
            theirs = hf.generate(torch.tensor([prompt], device=device), max_new_tokens=NEW_TOKENS,
                                 min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)  # fmt: skip
            # Agreement up to the first difference: after it the two continue different texts.
            pairs = zip(ours, theirs[0, len(prompt) :].tolist(), strict=True)
            agree += next((k for k, (a, b) in enumerate(pairs) if a != b), len(ours))
            total += len(ours)
    rate = agree / total
    with capsys.disabled():
        print(f"\nbf16 greedy agreement with transformers ({device}): {rate:.3f} "
              f"({agree} of {total} tokens before the first difference)")  # fmt: skip
    assert total == len(MODELS) * len(PROMPTS) * NEW_TOKENS
