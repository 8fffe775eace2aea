"""Architectures a model market serves beyond the Llama family (Qwen3's q/k norms, Phi-3's fused
projections, Gemma's scaled embeddings, soft-capping and sliding windows), on random weights of
each family's config (all through the native paged-KV runners): greedy tokens identical to
transformers' own ``generate``, and their logprobs within 1e-4, while the engine swaps their KV
out and back, switches to another model between steps, and drops and recomputes their KV."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from aegaeon.gpu_worker.engine import Engine, EngineConfig
from engine_helpers import GREEDY, NEW_TOKENS

PROMPTS = [[5, 17, 30, 42, 9, 11, 250, 3, 77, 120], [100, 200, 300, 7], list(range(3, 33))]
"""Prefilled as one batch: the second's padding positions lie beyond its sliding window."""
SMALL = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
         "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}  # fmt: skip
FAMILIES = {
    "qwen3": {"head_dim": 32},  # heads × head_dim ≠ hidden size, as in the real Qwen3 configs
    "phi3": {"sliding_window": 8},
    "gemma": {"head_dim": 32},  # heads × head_dim ≠ hidden size, as in Gemma 7B
    "gemma2": {  # layer_types default to local, global; softcaps low enough to bite
        "head_dim": 16,
        "sliding_window": 8,
        "query_pre_attn_scalar": 24,
        "attn_logit_softcapping": 2.0,
        "final_logit_softcapping": 3.0,
    },
    "gemma3_text": {
        "head_dim": 16,
        "sliding_window": 8,
        "layer_types": ["sliding_attention", "full_attention"],
        "query_pre_attn_scalar": 24,
        "rope_theta": 10000.0,
        "rope_local_base_freq": 100.0,
        "rope_scaling": {"rope_type": "linear", "factor": 2.0},  # global layers only
        "final_logit_softcapping": 3.0,
    },
}
"""Each family's distinctive settings; a sliding window of 8 is shorter than every sequence."""
NATIVE_FAMILIES = {"qwen3", "phi3", "gemma", "gemma2", "gemma3_text"}
"""Served by the native paged-KV runners; the others by the fallback runner."""


def _spread_weights(model: torch.nn.Module) -> None:
    """Random init leaves every norm weight neutral (so swapping two norms changes nothing) and
    attention scores far below the soft-cap; spread both so that each feature shows."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.5)
            elif any(proj in name for proj in ("q_proj", "k_proj", "qkv_proj")):
                param.mul_(8.0)


@pytest.fixture(scope="module")
def family_models(tmp_path_factory) -> dict[str, tuple[Path, list[list[int]], list[list[float]]]]:
    """model type → (folder, transformers' greedy tokens for each prompt, their logprobs)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out = {}
    for model_type, extra in FAMILIES.items():
        torch.manual_seed(len(model_type))
        config = AutoConfig.for_model(model_type, **SMALL, **extra)
        # Eager attention: transformers' own definition of each family. Where SDPA is Gemma 2's
        # default (transformers 5.17), scores are not soft-capped: other tokens than eager's.
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        _spread_weights(model)
        folder = tmp_path_factory.mktemp("families") / model_type
        model.save_pretrained(folder)
        refs, ref_logprobs = [], []
        for prompt in PROMPTS:
            gen = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS,
                                 min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                                 output_logits=True, return_dict_in_generate=True)  # fmt: skip
            tokens = gen.sequences[0, len(prompt) :].tolist()
            rows = [torch.log_softmax(step[0].float(), -1) for step in gen.logits]
            refs.append(tokens)
            ref_logprobs.append([float(row[t]) for row, t in zip(rows, tokens, strict=True)])
        out[model_type] = (folder, refs, ref_logprobs)
    return out


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_a_family_stays_exact_through_swaps_switches_and_recompute(
    family_models, demo_models_dir, device, tmp_path, model_type
):
    # Logprobs too: a final soft-cap is monotonic, so greedy tokens alone cannot see it.
    folder, refs, ref_logprobs = family_models[model_type]
    engine = Engine(EngineConfig(device=device, dtype="float32", arena_bytes=256 << 20,
                                 host_kv_bytes=16 << 20, host_kv_dir=str(tmp_path)))  # fmt: skip
    try:
        engine.register_model(model_type, folder)
        engine.register_model("other", demo_models_dir / "demo-llama")
        assert engine.specs[model_type].kind == ("native" if model_type in NATIVE_FAMILIES else "fallback")  # fmt: skip
        ids = [f"r{i}" for i in range(len(PROMPTS))]
        engine.switch_to(model_type)
        for rid, prompt in zip(ids, PROMPTS, strict=True):
            engine.add_request(rid, model_type, prompt, GREEDY)
        got: dict[str, list[int]] = {rid: [] for rid in ids}
        logprobs: dict[str, list[float | None]] = {rid: [] for rid in ids}
        step = 0
        while live := [rid for rid in ids if rid in engine.request_ids()]:
            for out in engine.step(live):
                assert out.error is None, out.error
                got[out.request_id].append(out.token_id)
                logprobs[out.request_id].append(out.logprob)
            step += 1
            if step % 3 == 1:
                engine.swap_out(live)  # KV to the host pool and back at the next step
            elif step % 3 == 2:
                engine.switch_to("other")  # another model between two steps
                engine.switch_to(model_type)
            elif live[0] in engine.request_ids():
                engine.drop_kv(live[0])  # recomputed from prompt + tokens so far
        assert [got[rid] for rid in ids] == refs
        for rid, expected in zip(ids, ref_logprobs, strict=True):
            assert logprobs[rid] == pytest.approx(expected, abs=1e-4)
        assert engine.counters["swapped_out"] > 0 and engine.counters["dropped"] > 0
    finally:
        engine.close()


def _decode_alone(engine: Engine, model: str, prompt: list[int], interrupt: bool) -> list[int]:
    engine.switch_to(model)
    engine.add_request("r", model, prompt, GREEDY)
    tokens = []
    for step in range(NEW_TOKENS):
        if interrupt and step % 3 == 0:
            engine.swap_out(["r"])
        elif interrupt and step % 3 == 1:
            engine.switch_to("other")
            engine.switch_to(model)
        elif interrupt:
            engine.drop_kv("r")
        tokens += [out.token_id for out in engine.step(["r"])]
    return tokens


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_a_bf16_family_model_is_bitwise_the_same_through_swaps_switches_and_recompute(
    family_models, demo_models_dir, device, tmp_path, model_type
):
    # The bf16 rule: the engine against itself, uninterrupted (see test_bf16.py).
    from transformers import AutoModelForCausalLM

    folder = tmp_path / model_type
    model = AutoModelForCausalLM.from_pretrained(family_models[model_type][0], dtype=torch.bfloat16)
    model.save_pretrained(folder)
    engine = Engine(EngineConfig(device=device, dtype="bfloat16", arena_bytes=256 << 20,
                                 host_kv_bytes=16 << 20, host_kv_dir=str(tmp_path)))  # fmt: skip
    try:
        engine.register_model(model_type, folder)
        engine.register_model("other", demo_models_dir / "demo-llama")
        for prompt in PROMPTS:
            plain = _decode_alone(engine, model_type, prompt, interrupt=False)
            assert _decode_alone(engine, model_type, prompt, interrupt=True) == plain
        assert engine.counters["swapped_out"] > 0 and engine.counters["dropped"] > 0
    finally:
        engine.close()


@pytest.mark.parametrize(
    ("model_type", "settings"),
    [("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}),
     ("phi3", {"partial_rotary_factor": 0.75}),
     ("phi3", {"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0]}}),
     ("qwen3", {"use_sliding_window": True, "max_window_layers": 1}),
     ("gemma2", {"use_bidirectional_attention": True}),
     ("gemma", {"attention_bias": True}),
     ("gemma3_text", {"rope_parameters": {"full_attention": {"rope_type": "dynamic", "factor": 2.0},
                                          "sliding_attention": {"rope_type": "default"}}})],
)  # fmt: skip
def test_settings_the_native_runner_does_not_compute_go_to_the_fallback(model_type, settings):
    from aegaeon.gpu_worker.weights_loader import _kind

    assert _kind({"model_type": model_type}, Path("config.json")) == "native"
    assert _kind({"model_type": model_type, **settings}, Path("config.json")) == "fallback"
