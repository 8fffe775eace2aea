"""What a registered model is: its config, its runner kind, and where its weights lie.

Everything that can be wrong with a model folder (unknown architecture, missing or corrupt
config, missing or corrupt weights, tensors the runner needs but the file lacks) is found here,
at registration, and reported as a ``ModelError`` naming the file, never later inside torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aegaeon.weights import KVShape, SafetensorsIndex, WeightsError, read_index

NATIVE_TYPES = {"llama", "qwen2", "mistral"}
"""model_type values the native paged-KV runner serves (the Llama family)."""
FALLBACK_TYPES = {"gpt2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text"}
"""model_type values served by the transformers-based fallback runner (each checked token-exact
against transformers under swap, switches and recompute: tests/engine/test_architectures.py)."""

NATIVE_ACTS = {"silu", "gelu", "relu"}
"""Activations the native runner's MLP implements."""

TORCH_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


class ModelError(ValueError):
    """A model folder or weights file cannot be served. The message names the file."""


@dataclass
class ModelSpec:
    """A registered model: HF config, runner kind, host-cache weights index, EOS ids."""

    name: str
    model_dir: Path
    weights_path: Path
    hf_config: Any
    kind: str  # "native" | "fallback"
    index: SafetensorsIndex
    eos_token_ids: tuple[int, ...]

    @property
    def weight_bytes(self) -> int:
        return self.index.data_bytes

    @property
    def kv_shape(self) -> KVShape:
        c = self.hf_config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        return KVShape(c.num_hidden_layers, kv_heads, head_dim)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelError(f"missing file: {path}")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: corrupt JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return data


def _kind(raw: dict[str, Any], path: Path) -> str:
    model_type = raw.get("model_type")
    if model_type in NATIVE_TYPES:
        return "native"
    if model_type in FALLBACK_TYPES:
        return "fallback"
    known = sorted(NATIVE_TYPES | FALLBACK_TYPES)
    raise ModelError(
        f"{path}: unsupported architecture model_type={model_type!r} (supported: {known})"
    )


def _eos_ids(model_dir: Path, raw: dict[str, Any]) -> tuple[int, ...]:
    gen_path = model_dir / "generation_config.json"
    eos = _read_json(gen_path).get("eos_token_id") if gen_path.is_file() else None
    if eos is None:
        eos = raw.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))


def required_tensors(spec_kind: str, config: Any) -> list[str]:
    """The tensor names the native runner binds (the fallback binds whatever its module has)."""
    if spec_kind != "native":
        return []
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        names += [p + n + ".weight" for n in (
            "input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
            "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]  # fmt: skip
    return names


def load_spec(
    name: str, model_dir: str | Path, weights_path: str | Path | None = None
) -> ModelSpec:
    """Validate a model folder and its weights file; everything wrong raises ``ModelError``."""
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    raw = _read_json(config_path)
    kind = _kind(raw, config_path)
    try:
        hf_config = AutoConfig.from_pretrained(model_dir)
    except Exception as exc:
        raise ModelError(f"{config_path}: transformers cannot read it: {exc}") from None
    if kind == "native" and getattr(hf_config, "hidden_act", "silu") not in NATIVE_ACTS:
        raise ModelError(
            f"{config_path}: hidden_act={hf_config.hidden_act!r} is not supported natively"
        )
    path = Path(weights_path) if weights_path is not None else model_dir / "model.safetensors"
    try:
        index = read_index(path)
    except WeightsError as exc:
        raise ModelError(str(exc)) from None
    for tname, entry in index.tensors.items():
        if entry.dtype not in TORCH_DTYPES:
            raise ModelError(f"{path}: tensor {tname!r} has dtype {entry.dtype}; need F32/F16/BF16")
    missing = [t for t in required_tensors(kind, hf_config) if t not in index.tensors]
    if missing:
        raise ModelError(
            f"{path}: missing tensor(s) {missing[:4]}{'...' if len(missing) > 4 else ''}"
        )
    return ModelSpec(name, model_dir, path, hf_config, kind, index, _eos_ids(model_dir, raw))
