"""The native runner for the Gemma family (Gemma, Gemma 2, Gemma 3 text) over the paged KV.

It reuses ``LlamaRunner``'s prefill and decode passes and overrides what Gemma computes
differently, in transformers' order and dtypes:

    x = embed(tokens) * sqrt(hidden_size)          (the scale cast to the compute dtype first)
    rms(x, w) = x / rms(x) * (1 + w)               (in float32, cast back at the end)
    for each layer:  x += post_attn(o(attn(...)))  (Gemma 2/3: post-attention norm)
                     x += post_mlp(down(gelu_tanh(gate(pre_mlp(x))) * up(pre_mlp(x))))
    logits = tanh(logits / cap) * cap               (Gemma 2/3: final soft-capping, if set)

Attention scales scores by ``query_pre_attn_scalar ** -0.5`` (Gemma 2/3). Gemma 2 soft-caps the
scores, ``tanh(scores / cap) * cap`` before the mask, which SDPA cannot do, so those layers
compute attention explicitly (as transformers' eager attention does). ``config.layer_types``
makes layers local (sliding window) or global; Gemma 3 also gives each type its own rope
(``rope_parameters[layer_type]``) and norms q and k per head before the rope.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from aegaeon.gpu_worker.runners.llama import AttentionKind, LlamaRunner, _Layer, rope_inv_freq

SLIDING = "sliding_attention"
"""The ``config.layer_types`` entry of a local (windowed) layer; every other type is global."""


class GemmaRunner(LlamaRunner):
    """Forward passes of one Gemma-family model over paged KV; rebound on every switch."""

    def bind(self, config: Any, tensors: dict[str, torch.Tensor]) -> None:
        """Point the skeleton at a model's weights (views into the arena) and its config."""
        c = config
        super().bind(c, tensors)
        if c.model_type != "gemma":
            self.scale = float(c.query_pre_attn_scalar) ** -0.5
        # Gemma 3's attention ignores attn_logit_softcapping (transformers never passes it on)
        self.softcap = c.attn_logit_softcapping if c.model_type == "gemma2" else None
        self.final_softcap = getattr(c, "final_logit_softcapping", None)
        # transformers keeps the scale as a float32 tensor and casts it to the weights' dtype
        scale = torch.tensor(c.hidden_size**0.5, dtype=torch.float32)
        self._embed_scale = scale.to(device=self.device, dtype=self.dtype)

    def _attention_kinds(self, config: Any) -> tuple[list[AttentionKind], list[int]]:
        """One kind per layer type in ``config.layer_types`` (Gemma: one global kind)."""
        c = config
        types = list(getattr(c, "layer_types", None) or ["full_attention"] * c.num_hidden_layers)
        names = sorted(set(types))
        per_type_rope = all(name in (getattr(c, "rope_parameters", None) or {}) for name in names)
        kinds = [
            AttentionKind(
                c.sliding_window if name == SLIDING else None,
                *rope_inv_freq(c, self.device, name if per_type_rope else None),
            )
            for name in names
        ]
        return kinds, [names.index(t) for t in types]

    def _layer(self, t: dict[str, torch.Tensor], p: str) -> _Layer:
        layer = super()._layer(t, p)
        if p + "pre_feedforward_layernorm.weight" in t:  # Gemma 2/3: four norms per layer
            layer.post_attn_norm = layer.ln2
            layer.ln2 = t[p + "pre_feedforward_layernorm.weight"]
            layer.post_mlp_norm = t[p + "post_feedforward_layernorm.weight"]
        return layer

    # ------------------------------------------------------------------ building blocks

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Gemma's RMSNorm: ``x * (1 + weight)``, all in float32, cast back only at the end."""
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + weight.float())).type_as(x)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.embed) * self._embed_scale

    def _visible(
        self, q_pos: torch.Tensor, k_pos: torch.Tensor, k_len: torch.Tensor, window: int | None
    ) -> torch.Tensor:
        # A padding query (past its request's length) may see no key inside the window; give it
        # the last real query's keys so explicit attention stays finite (its output is unused).
        q_pos = torch.minimum(q_pos, k_len[:, None] - 1)
        return super()._visible(q_pos, k_pos, k_len, window)

    def _capped_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """transformers' eager attention with soft-capped scores (k, v with q's head count or
        broadcastable to it); ``mask`` is a bool (True = visible) or an additive mask."""
        assert self.softcap is not None
        scores = torch.matmul(q, k.transpose(-2, -1)) * self.scale
        scores = torch.tanh(scores / self.softcap) * self.softcap
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(probs, v)

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        if self.softcap is None:
            return super()._attend(q, k, v, mask)
        groups = self.heads // self.kv_heads
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        out = self._capped_attention(q, k, v, mask)
        return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)

    def _decode_attend(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        if self.softcap is None:
            return super()._decode_attend(q, keys, values, mask)
        return self._capped_attention(q, keys, values, mask)

    def _logits(self, x_last: torch.Tensor) -> torch.Tensor:
        logits = F.linear(self._rms(x_last, self.norm), self.lm_head)
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits.float()
