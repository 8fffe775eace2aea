"""The fallback runner: architectures without a native runner (GPT-2 style), on transformers' modules.

The module skeleton is built once per architecture and shape with its parameters on the meta
device (no memory, no random init) and its computed buffers (rotary frequencies, embedding
scales) on the real one; a switch assigns the arena's weight views to its parameters. Each request keeps
its own transformers cache; on preemption that cache moves to host memory as a whole and back.
Requests run one at a time (the batch is a loop), which is what a fallback can promise.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from aegaeon.gpu_worker.weights_loader import ModelError, ModelSpec

KVList = list[tuple[torch.Tensor, torch.Tensor]]
"""A request's cache: (keys, values) per layer, each [1, heads, tokens, head_dim]."""


def _skeleton_key(config: Any) -> str:
    return config.to_json_string(use_diff=False)


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Build a module with its parameters on the meta device (no memory: ``bind`` assigns the
    arena's views) and its buffers on the real one: buffers computed at construction (rotary
    frequencies, Gemma's embedding scale) have no other source."""
    register = torch.nn.Module.register_parameter

    def on_meta(module: torch.nn.Module, name: str, param: Any) -> None:
        if param is not None:
            param = torch.nn.Parameter(param.to("meta"), requires_grad=False)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register  # type: ignore[method-assign]


class FallbackRunner:
    """Runs any ``AutoModelForCausalLM`` architecture over arena weights, one request at a time."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device = device
        self.dtype = dtype
        self._skeletons: dict[str, torch.nn.Module] = {}
        self.model: torch.nn.Module | None = None

    def skeleton(self, spec: ModelSpec) -> torch.nn.Module:
        """The (cached) meta-device module for this architecture and shape."""
        from transformers import AutoModelForCausalLM

        key = _skeleton_key(spec.hf_config)
        if key not in self._skeletons:
            with torch.device(self.device), _parameters_on_meta():
                model = AutoModelForCausalLM.from_config(spec.hf_config, dtype=self.dtype)
            self._skeletons[key] = model.eval()
        return self._skeletons[key]

    def check(self, spec: ModelSpec) -> None:
        """Registration-time check that the file has every parameter the module needs."""
        model = self.skeleton(spec)
        tied = _tied_names(model)
        missing = [
            n for n, _ in model.named_parameters() if n not in spec.index.tensors and n not in tied
        ]
        if missing:
            raise ModelError(f"{spec.weights_path}: missing tensor(s) {missing[:4]}")

    def bind(self, spec: ModelSpec, tensors: dict[str, torch.Tensor]) -> None:
        """Assign arena views as the skeleton's parameters (no copy), then re-tie embeddings."""
        model = self.skeleton(spec)
        for name, _ in list(model.named_parameters()):
            if name in tensors:
                module_name, _, attr = name.rpartition(".")
                module = model.get_submodule(module_name)
                module._parameters[attr] = torch.nn.Parameter(tensors[name], requires_grad=False)
        if getattr(spec.hf_config, "tie_word_embeddings", False):
            model.tie_weights()  # type: ignore[operator]
        self.model = model

    def forward(self, tokens: list[int], past: KVList | None) -> tuple[torch.Tensor, KVList]:
        """Feed ``tokens`` after ``past``; returns last-position float32 logits and the new cache."""
        from transformers import DynamicCache

        assert self.model is not None, "bind() first"
        cache = DynamicCache(ddp_cache_data=past) if past else DynamicCache()
        ids = torch.tensor([tokens], device=self.device)
        # transformers renamed past_key_values to cache in 5.x; accept either generation.
        key = (
            "cache"
            if "cache" in inspect.signature(self.model.forward).parameters
            else "past_key_values"
        )
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **{key: cache})
        new_cache = getattr(out, "cache", None) or out.past_key_values
        kv = [(layer.keys, layer.values) for layer in new_cache.layers]
        return out.logits[0, -1].float(), kv


def _tied_names(model: torch.nn.Module) -> set[str]:
    keys = getattr(model, "_tied_weights_keys", None) or {}
    return set(keys if isinstance(keys, dict | list | set) else [])


def cache_bytes(kv: KVList) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)


def cache_to_host(kv: KVList, out: torch.Tensor) -> list[tuple[int, ...]]:
    """Copy a request's whole cache into ``out`` (host bytes); returns the shapes to restore it."""
    offset, shapes = 0, []
    for k, v in kv:
        for t in (k, v):
            n = t.numel() * t.element_size()
            out[offset : offset + n].copy_(t.contiguous().view(-1).view(torch.uint8))
            offset += n
            shapes.append(tuple(t.shape))
    return shapes


def cache_from_host(data: torch.Tensor, shapes: list[tuple[int, ...]], dtype: torch.dtype, device: torch.device) -> KVList:  # fmt: skip
    """Rebuild a cache on the device from host bytes written by ``cache_to_host``."""
    tensors, offset = [], 0
    esize = torch.empty((), dtype=dtype).element_size()
    for shape in shapes:
        n = int(torch.Size(shape).numel()) * esize
        tensors.append(data[offset : offset + n].view(dtype).view(shape).to(device, copy=True))
        offset += n
    return [(tensors[i], tensors[i + 1]) for i in range(0, len(tensors), 2)]
