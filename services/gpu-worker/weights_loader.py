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

GEMMA_TYPES = {"gemma", "gemma2", "gemma3_text"}
"""model_type values of the Gemma family (runners/gemma.py)."""
NATIVE_TYPES = {"llama", "qwen2", "mistral", "qwen3", "phi3", *GEMMA_TYPES}
"""model_type values the native paged-KV runners serve (the Llama family: Qwen3 adds per-head
q/k norms, Phi-3 stores q/k/v and gate/up fused; and the Gemma family)."""
FALLBACK_TYPES = {"gpt2", *NATIVE_TYPES}
"""model_type values served by the transformers-based fallback runner: GPT-2, and the native
families' settings the native runners do not compute (``_needs_fallback``)."""

NATIVE_ACTS = {"silu", "gelu", "relu", "gelu_pytorch_tanh"}
"""Activations the native runners' MLP implements."""
STATIC_ROPE_TYPES = {"default", "linear"}
"""Gemma rope types the native runner computes (the frequencies do not depend on the length)."""

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
    if model_type in NATIVE_TYPES and not _needs_fallback(raw):
        return "native"
    if model_type in FALLBACK_TYPES:
        return "fallback"
    known = sorted(NATIVE_TYPES | FALLBACK_TYPES)
    raise ModelError(
        f"{path}: unsupported architecture model_type={model_type!r} (supported: {known})"
    )


def _needs_fallback(raw: dict[str, Any]) -> bool:
    """Settings of a native family that the native runner does not compute: partial rotary
    embeddings, ropes whose frequencies change with the sequence length (dynamic NTK, Phi-3's
    long-context rope), and sliding windows on some layers only (Qwen3's ``max_window_layers``)."""
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if raw.get("model_type") in GEMMA_TYPES:
        return _gemma_needs_fallback(raw, rope)
    partial = raw.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0))
    per_layer_window = raw.get("model_type") == "qwen3" and raw.get("use_sliding_window")
    length_dependent = rope.get("rope_type", rope.get("type")) in ("dynamic", "longrope")
    return partial != 1.0 or length_dependent or bool(per_layer_window)


def _gemma_needs_fallback(raw: dict[str, Any], rope: dict[str, Any]) -> bool:
    """Gemma settings the native runner does not compute: bidirectional attention, attention
    biases, partial rotary embeddings and rope types other than default and linear (Gemma 3
    keeps one rope entry per layer type)."""
    ropes = [r for r in rope.values() if isinstance(r, dict)] or [rope]
    types = {r.get("rope_type", r.get("type", "default")) for r in ropes}
    partial = any(r.get("partial_rotary_factor", 1.0) != 1.0 for r in [raw, *ropes])
    unusual = raw.get("use_bidirectional_attention") or raw.get("attention_bias")
    return bool(unusual) or partial or not types <= STATIC_ROPE_TYPES


def _eos_ids(model_dir: Path, raw: dict[str, Any]) -> tuple[int, ...]:
    gen_path = model_dir / "generation_config.json"
    eos = _read_json(gen_path).get("eos_token_id") if gen_path.is_file() else None
    if eos is None:
        eos = raw.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))


def activation(config: Any) -> str:
    """The MLP activation's transformers name: Gemma 2 and 3 read ``hidden_activation``."""
    if config.model_type in GEMMA_TYPES and config.model_type != "gemma":
        return str(config.hidden_activation)
    return str(getattr(config, "hidden_act", "silu"))


def required_tensors(spec_kind: str, config: Any) -> list[str]:
    """The tensor names the native runner binds (the fallback binds whatever its module has)."""
    if spec_kind != "native":
        return []
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    fused = config.model_type == "phi3"
    attention = ["self_attn.qkv_proj"] if fused else ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]  # fmt: skip
    mlp = ["mlp.gate_up_proj"] if fused else ["mlp.gate_proj", "mlp.up_proj"]
    qk_norms = config.model_type in ("qwen3", "gemma3_text")
    norms = ["self_attn.q_norm", "self_attn.k_norm"] if qk_norms else []
    if config.model_type in ("gemma2", "gemma3_text"):
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        names += [p + n + ".weight" for n in ["input_layernorm", "post_attention_layernorm",
                  *attention, "self_attn.o_proj", *mlp, "mlp.down_proj", *norms]]  # fmt: skip
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
    act = activation(hf_config)
    if kind == "native" and act not in NATIVE_ACTS:
        if hf_config.model_type not in FALLBACK_TYPES:
            raise ModelError(f"{config_path}: hidden_act={act!r} is not supported natively")
        kind = "fallback"
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
