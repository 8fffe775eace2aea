"""Architectures a model market serves beyond the Llama family (Qwen3's q/k norms, Phi-3's fused
projections, Gemma's scaled embeddings, soft-capping and sliding windows), on random weights of
each family's config: greedy tokens identical to transformers' own ``generate`` while the engine
swaps their KV out and back, switches to another model between steps, and drops and recomputes
their KV."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from aegaeon.gpu_worker.engine import Engine, EngineConfig
from engine_helpers import GREEDY, NEW_TOKENS

PROMPTS = [[5, 17, 30, 42, 9, 11, 250, 3, 77, 120], [100, 200, 300, 7]]
SMALL = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
         "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}  # fmt: skip
FAMILIES = {
    "qwen3": {"head_dim": 16},
    "phi3": {},
    "gemma2": {
        "head_dim": 16,
        "sliding_window": 8,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
    },
    "gemma3_text": {"head_dim": 16, "sliding_window": 8, "final_logit_softcapping": 30.0},
}
"""Each family's distinctive settings; a sliding window of 8 is shorter than every sequence."""


@pytest.fixture(scope="module")
def family_models(tmp_path_factory) -> dict[str, tuple[Path, list[list[int]]]]:
    """model type → (folder, transformers' greedy tokens for each prompt)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out = {}
    for model_type, extra in FAMILIES.items():
        torch.manual_seed(len(model_type))
        config = AutoConfig.for_model(model_type, **SMALL, **extra)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        folder = tmp_path_factory.mktemp("families") / model_type
        model.save_pretrained(folder)
        refs = []
        for prompt in PROMPTS:
            ids = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS,
                                 min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)  # fmt: skip
            refs.append(ids[0, len(prompt) :].tolist())
        out[model_type] = (folder, refs)
    return out


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_a_family_stays_exact_through_swaps_switches_and_recompute(
    family_models, demo_models_dir, device, tmp_path, model_type
):
    folder, refs = family_models[model_type]
    engine = Engine(EngineConfig(device=device, dtype="float32", arena_bytes=256 << 20,
                                 host_kv_bytes=16 << 20, host_kv_dir=str(tmp_path)))  # fmt: skip
    try:
        engine.register_model(model_type, folder)
        engine.register_model("other", demo_models_dir / "demo-llama")
        ids = [f"r{i}" for i in range(len(PROMPTS))]
        engine.switch_to(model_type)
        for rid, prompt in zip(ids, PROMPTS, strict=True):
            engine.add_request(rid, model_type, prompt, GREEDY)
        got: dict[str, list[int]] = {rid: [] for rid in ids}
        step = 0
        while live := [rid for rid in ids if rid in engine.request_ids()]:
            for out in engine.step(live):
                assert out.error is None, out.error
                got[out.request_id].append(out.token_id)
            step += 1
            if step % 3 == 1:
                engine.swap_out(live)  # KV to the host pool and back at the next step
            elif step % 3 == 2:
                engine.switch_to("other")  # another model between two steps
                engine.switch_to(model_type)
            elif live[0] in engine.request_ids():
                engine.drop_kv(live[0])  # recomputed from prompt + tokens so far
        assert [got[rid] for rid in ids] == refs
        assert engine.counters["swapped_out"] > 0 and engine.counters["dropped"] > 0
    finally:
        engine.close()
