"""Tiny Llama-layout models for the model-store's tests: random weights with a Hugging Face
checkpoint's names and shapes, written as a folder (optionally sharded), and the module-scoped
``models_dir`` fixture of three of them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file


def llama_tensors(hidden: int, layers: int, heads: int, kv_heads: int, vocab: int, seed: int):
    """Random weights with the names and shapes of a Hugging Face Llama checkpoint."""
    rng = np.random.default_rng(seed)
    head_dim = hidden // heads
    inter = hidden * 2

    def w(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32)

    tensors = {"model.embed_tokens.weight": w(vocab, hidden), "model.norm.weight": w(hidden)}
    tensors["lm_head.weight"] = w(vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors |= {
            p + "self_attn.q_proj.weight": w(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": w(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": w(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": w(hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": w(inter, hidden),
            p + "mlp.up_proj.weight": w(inter, hidden),
            p + "mlp.down_proj.weight": w(hidden, inter),
            p + "input_layernorm.weight": w(hidden),
            p + "post_attention_layernorm.weight": w(hidden),
        }
    return tensors


def write_model(folder: Path, *, hidden=32, layers=2, heads=4, kv_heads=2, vocab=96, seed=0, shards=1):  # fmt: skip
    """A Hugging Face Llama folder: config.json, safetensors (optionally sharded), tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "intermediate_size": hidden * 2, "vocab_size": vocab, "max_position_embeddings": 256,
        "dtype": "float32", "rms_norm_eps": 1e-6,
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    tensors = llama_tensors(hidden, layers, heads, kv_heads, vocab, seed)
    names = list(tensors)
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"))
    else:
        weight_map = {}
        for k in range(shards):
            file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[k::shards]}
            save_file(part, str(folder / file))
            weight_map |= dict.fromkeys(part, file)
        index = {"metadata": {}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    # A tokenizer file bigger than two FetchFile chunks, to exercise chunking.
    vocab_json = {"model": {"vocab": {f"tok{i}": i for i in range(70_000)}}}
    (folder / "tokenizer.json").write_text(json.dumps(vocab_json))
    return tensors


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three tiny models, one sharded, one with sizes that leave alignment gaps."""
    root = tmp_path_factory.mktemp("registry")
    write_model(root / "tiny-a", seed=1)
    # hidden 24 makes norm weights 96 bytes: not a multiple of 64, so alignment gaps appear.
    write_model(root / "tiny-b", hidden=24, heads=4, kv_heads=2, seed=2, shards=3)
    write_model(root / "tiny-c", hidden=16, heads=2, kv_heads=1, seed=3)
    return root


def model_nbytes(tensors: dict[str, np.ndarray]) -> int:
    return sum(t.nbytes for t in tensors.values())
