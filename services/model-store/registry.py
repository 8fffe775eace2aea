"""The model registry: which models a models directory holds, and what each one is.

A models directory is in Hugging Face layout, one folder (or symlink to a folder) per model; the
folder's name is the model's name. Describing a model reads only ``config.json`` and the
safetensors *headers*, never the weights, so scanning a directory of 70B models is instant.
A link whose target was moved or deleted still holds its name: it is listed as a problem (and the
model-store lets the admin API remove it), never skipped.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aegaeon.protocol import ModelInfo
from aegaeon.weights import (
    SAFETENSORS_DTYPES,
    KVShape,
    WeightsError,
    model_weight_files,
    read_index,
)

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
"""A model name is a file name and a NATS subject token: no dots, slashes, spaces or wildcards."""

CONFIG_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
"""Element size of the dtypes ``config.json`` names; the KV cache is kept in the model's dtype."""

_SAFETENSORS_TO_TORCH = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}

DEFAULT_CONTEXT_LENGTH = 2048


class ModelError(ValueError):
    """A model folder cannot be served. The message says which file and why."""


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid model name, else raise ModelError saying why not."""
    if not NAME_PATTERN.match(name):
        raise ModelError(
            f"invalid model name {name!r}: use 1-64 letters, digits, '-' or '_', starting with a "
            "letter or digit (names are file names and NATS subject tokens, so no '.' or '/')"
        )
    return name


def read_config(model_dir: Path) -> dict[str, Any]:
    """``config.json`` of a model folder, with multimodal wrappers unwrapped to the text model."""
    path = model_dir / "config.json"
    if not path.is_file():
        raise ModelError(f"{model_dir}: no config.json (not a Hugging Face model folder)")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: unreadable config: {exc}") from None
    if not isinstance(config, dict):
        raise ModelError(f"{path}: not a JSON object")
    return config


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's part of a config (``text_config`` for vision-language wrappers)."""
    inner = config.get("text_config")
    return {**config, **inner} if isinstance(inner, dict) else config


def _architecture(config: dict[str, Any], path: Path) -> tuple[str, str]:
    architectures = config.get("architectures") or []
    model_type = config.get("model_type")
    if not architectures or not isinstance(model_type, str):
        raise ModelError(f"{path}/config.json: needs 'architectures' and 'model_type'")
    architecture = str(architectures[0])
    if not architecture.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")):
        raise ModelError(
            f"{path}/config.json: architecture {architecture} is not a text-generation model"
        )
    return architecture, model_type


def _require_int(config: dict[str, Any], key: str, path: Path) -> int:
    value = config.get(key)
    if not isinstance(value, int) or value <= 0:
        raise ModelError(f"{path}/config.json: '{key}' must be a positive integer, got {value!r}")
    return value


def kv_shape(config: dict[str, Any], path: Path) -> KVShape:
    """KV geometry from a config (Llama-style names, with GPT-2's n_layer / n_head as fallback)."""
    config = _text_config(config)
    aliases = {
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "hidden_size": "n_embd",
    }
    norm = {key: config.get(key, config.get(alias)) for key, alias in aliases.items()}
    layers = _require_int(norm, "num_hidden_layers", path)
    heads = _require_int(norm, "num_attention_heads", path)
    hidden = _require_int(norm, "hidden_size", path)
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    return KVShape(layers, int(kv_heads), int(head_dim))


def context_length(config: dict[str, Any]) -> int:
    """The longest sequence the model was built for."""
    config = _text_config(config)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return DEFAULT_CONTEXT_LENGTH


@dataclass(frozen=True)
class WeightsSummary:
    """Totals over a model's safetensors files, from their headers."""

    files: list[Path]
    weight_bytes: int
    num_parameters: int
    dominant_dtype: str


def summarize_weights(model_dir: Path) -> WeightsSummary:
    """Validate every safetensors header of a model and add up its tensors."""
    try:
        files = model_weight_files(model_dir)
        indexes = [read_index(f) for f in files]
    except WeightsError as exc:
        raise ModelError(str(exc)) from None
    nbytes, params, by_dtype = 0, 0, dict[str, int]()
    for index in indexes:
        for entry in index.tensors.values():
            nbytes += entry.nbytes
            params += entry.nbytes // SAFETENSORS_DTYPES[entry.dtype]
            by_dtype[entry.dtype] = by_dtype.get(entry.dtype, 0) + entry.nbytes
    if not by_dtype:
        raise ModelError(f"{model_dir}: the safetensors files hold no tensors")
    dominant = max(by_dtype, key=lambda d: by_dtype[d])
    return WeightsSummary(files, nbytes, params, _SAFETENSORS_TO_TORCH.get(dominant, dominant))


def describe(model_dir: str | Path, name: str | None = None) -> ModelInfo:
    """Everything the system needs to know about one model folder, or a clear ModelError."""
    model_dir = Path(model_dir)
    name = check_name(name or model_dir.name)
    config = read_config(model_dir)
    architecture, model_type = _architecture(config, model_dir)
    shape = kv_shape(config, model_dir)
    weights = summarize_weights(model_dir)
    dtype = str(config.get("dtype") or config.get("torch_dtype") or weights.dominant_dtype)
    return ModelInfo(
        name=name,
        architecture=architecture,
        model_type=model_type,
        path=str(model_dir.resolve()),
        weight_bytes=weights.weight_bytes,
        num_parameters=weights.num_parameters,
        context_length=context_length(config),
        dtype=dtype,
        kv_bytes_per_token=shape.bytes_per_token(CONFIG_DTYPE_BYTES.get(dtype, 2)),
        created=int((model_dir / "config.json").stat().st_mtime),
    )


def missing_target(entry: Path) -> Path | None:
    """The target of ``entry`` when it is a link whose target is gone (moved or deleted), else
    None."""
    if not entry.is_symlink() or entry.exists():
        return None
    try:
        target = os.readlink(entry)
    except OSError:  # gone meanwhile
        return None
    return entry.parent / target  # a relative target is relative to the link's folder


def broken_link_text(entry: Path, target: Path) -> str:
    """Why a link whose target is gone cannot be served, naming the target."""
    return f"{entry} links to {target}, which is missing (moved or deleted)"


@dataclass
class Registry:
    """The models of one directory: good ones by name, and the folders that were refused, with
    why; ``broken_links``: those of the refused that are links whose target is gone, with it."""

    models: dict[str, ModelInfo] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)
    broken_links: dict[str, Path] = field(default_factory=dict)


def _signature(model_dir: Path) -> tuple[float, ...]:
    """Changes when the folder's config or weights change (for re-scanning only what changed)."""
    stamps = []
    for path in (model_dir, model_dir / "config.json", *model_dir.glob("*.safetensors*")):
        try:
            stamps.append(path.stat().st_mtime)
        except OSError:
            stamps.append(-1.0)
    return tuple(stamps)


class RegistryScanner:
    """Scans a models directory, re-reading only folders that changed since the last scan."""

    def __init__(self, models_dir: str | Path) -> None:
        self.models_dir = Path(models_dir)
        self._memo: dict[str, tuple[tuple[float, ...], ModelInfo | str]] = {}

    def scan(self) -> Registry:
        """The registry as the directory is now. A missing directory is an empty registry."""
        registry = Registry()
        entries = sorted(self.models_dir.iterdir()) if self.models_dir.is_dir() else []
        seen = set()
        for entry in entries:
            if entry.name.startswith("."):
                continue
            target = missing_target(entry)
            if target is not None:
                registry.problems[entry.name] = broken_link_text(entry, target)
                registry.broken_links[entry.name] = target
                continue
            if not entry.is_dir():
                continue
            seen.add(entry.name)
            result = self._describe(entry)
            if isinstance(result, ModelInfo):
                registry.models[result.name] = result
            else:
                registry.problems[entry.name] = result
        self._memo = {k: v for k, v in self._memo.items() if k in seen}
        return registry

    def _describe(self, entry: Path) -> ModelInfo | str:
        signature = _signature(entry)
        memo = self._memo.get(entry.name)
        if memo and memo[0] == signature:
            return memo[1]
        try:
            result: ModelInfo | str = describe(entry)
        except ModelError as exc:
            result = str(exc)
        except Exception as exc:  # one malformed folder must not break every models.* request
            result = f"{entry}: unreadable ({type(exc).__name__}: {exc})"
        self._memo[entry.name] = (signature, result)
        return result


def check_supported(info: ModelInfo) -> None:
    """Refuse a model type the engine cannot build (neither natively nor through transformers)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if info.model_type not in CONFIG_MAPPING_NAMES:
        raise ModelError(
            f"{info.path}: model_type {info.model_type!r} is not supported "
            "(not a transformers architecture)"
        )
