"""The native runner for the Llama family (Llama incl. GQA and rope scaling, Qwen2, Mistral).

It computes what transformers' modeling code computes, in the same order (so fp32 logits agree
within 1e-4), but over the paged KV region and with tensors that are views into the arena:

    x = embed(tokens)
    for each layer:  x += o(attn(rope(q(rms(x))), rope(k(rms(x))), v(rms(x))))   (K, V paged)
                     x += down(silu(gate(rms(x))) * up(rms(x)))
    logits = lm_head(rms(x)[last position of each request])

One instance per architecture is created once; ``bind`` points it at another model's weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from aegaeon.gpu_worker.paged_kv import PagedKV


@dataclass
class _Layer:
    ln1: torch.Tensor
    ln2: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    q_bias: torch.Tensor | None
    k_bias: torch.Tensor | None
    v_bias: torch.Tensor | None
    qkv: torch.Tensor | None = None  # q, k, v as one matrix when they lie back to back
    qkv_bias: torch.Tensor | None = None
    gate_up: torch.Tensor | None = None  # gate then up, likewise

    def __post_init__(self) -> None:
        biases = (self.q_bias, self.k_bias, self.v_bias)
        fused_bias = _back_to_back(list(biases)) if biases[0] is not None else None
        if biases[0] is None and any(b is not None for b in biases):
            return
        if biases[0] is None or fused_bias is not None:
            self.qkv = _back_to_back([self.q, self.k, self.v])
            self.qkv_bias = fused_bias
        self.gate_up = _back_to_back([self.gate, self.up])


def _back_to_back(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    """One view stacking tensors (along dim 0) that lie back to back in memory, else None.

    Weights are views into the arena at the file's offsets; where a file stores q, k, v (or
    gate, up) consecutively, one matmul over the joint view replaces three (two): no copy.
    """
    first = parts[0]
    if first is None:
        return None
    end = first.data_ptr()
    for part in parts:
        if (
            part is None
            or not part.is_contiguous()
            or part.data_ptr() != end
            or part.shape[1:] != first.shape[1:]
            or part.dtype != first.dtype
        ):
            return None
        end += part.numel() * part.element_size()
    rows = sum(p.shape[0] for p in parts if p is not None)
    return first.as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset())


def rope_inv_freq(config: Any, device: torch.device) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling, exactly as transformers computes them."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, device)
        return inv_freq.float(), float(scaling)
    base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    exponents = (
        torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim
    )
    return 1.0 / (base**exponents), 1.0


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaRunner:
    """Forward passes of one Llama-family model over paged KV; rebound on every switch."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device = device
        self.dtype = dtype
        self.layers: list[_Layer] = []
        self.act: Callable[[torch.Tensor], torch.Tensor] = F.silu

    def bind(self, config: Any, tensors: dict[str, torch.Tensor]) -> None:
        """Point the skeleton at a model's weights (views into the arena) and its config."""
        c = config
        self.heads = c.num_attention_heads
        self.kv_heads = getattr(c, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // self.heads
        self.eps = c.rms_norm_eps
        self.sliding_window = (
            getattr(c, "sliding_window", None) if getattr(c, "use_sliding_window", True) else None
        )
        acts: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
            "silu": F.silu,
            "gelu": F.gelu,
            "relu": F.relu,
        }
        self.act = acts[c.hidden_act]
        self.inv_freq, self.rope_scaling = rope_inv_freq(c, self.device)
        # cat(freqs, freqs) == positions * cat(inv_freq, inv_freq): one op per step instead of two
        self._inv_freq2 = torch.cat((self.inv_freq, self.inv_freq))
        self._eps = torch.tensor(self.eps, dtype=torch.float32, device=self.device)
        self.embed = tensors["model.embed_tokens.weight"]
        self.norm = tensors["model.norm.weight"]
        self.lm_head = (
            tensors.get("lm_head.weight", self.embed) if not c.tie_word_embeddings else self.embed
        )
        self.layers = [
            self._layer(tensors, f"model.layers.{i}.") for i in range(c.num_hidden_layers)
        ]

    @staticmethod
    def _layer(t: dict[str, torch.Tensor], p: str) -> _Layer:
        a, m = p + "self_attn.", p + "mlp."
        return _Layer(
            t[p + "input_layernorm.weight"], t[p + "post_attention_layernorm.weight"],
            t[a + "q_proj.weight"], t[a + "k_proj.weight"], t[a + "v_proj.weight"],
            t[a + "o_proj.weight"], t[m + "gate_proj.weight"], t[m + "up_proj.weight"],
            t[m + "down_proj.weight"],
            t.get(a + "q_proj.bias"), t.get(a + "k_proj.bias"), t.get(a + "v_proj.bias"),
        )  # fmt: skip

    # ------------------------------------------------------------------ building blocks

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """transformers' RMSNorm (mean of squares in float32) in fewer, cheaper ops: the mean is
        a sum scaled by 1/n inside the eps add (``mean`` costs several small ops on the CPU)."""
        h = x if x.dtype == torch.float32 else x.to(torch.float32)
        squares = torch.mul(h, h).sum(-1, keepdim=True)
        h = h * torch.add(self._eps, squares, alpha=1.0 / h.shape[-1]).rsqrt_()
        return weight * (h if x.dtype == torch.float32 else h.to(x.dtype))

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for positions of any shape S -> [*S, head_dim] (float32 math, as in HF)."""
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.rope_scaling).to(self.dtype)
        return cos, (emb.sin() * self.rope_scaling).to(self.dtype)

    def _qkv(
        self, layer: _Layer, h: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q = F.linear(h, layer.q, layer.q_bias)
        k = F.linear(h, layer.k, layer.k_bias)
        v = F.linear(h, layer.v, layer.v_bias)
        return q, k, v

    def _mlp(self, layer: _Layer, x: torch.Tensor) -> torch.Tensor:
        h = self._rms(x, layer.ln2)
        if layer.gate_up is not None:
            gate_up = F.linear(h, layer.gate_up)
            inter = gate_up.shape[-1] // 2
            return F.linear(self.act(gate_up[..., :inter]) * gate_up[..., inter:], layer.down)
        return F.linear(self.act(F.linear(h, layer.gate)) * F.linear(h, layer.up), layer.down)

    def _decode_qkv(
        self, layer: _Layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated q [B, heads, D] and k [B, kv_heads * D], and v [B, kv_heads * D]."""
        batch, heads, kv_heads, dim, half = h.shape[0], self.heads, self.kv_heads, self.head_dim, self.head_dim // 2  # fmt: skip
        if layer.qkv is not None:  # one matmul, and q and k rotated together
            qkv = F.linear(h, layer.qkv, layer.qkv_bias).view(batch, heads + 2 * kv_heads, dim)
            qk = qkv[:, : heads + kv_heads]
            qk = qk * cos + qk.roll(half, -1) * sin
            v = qkv[:, heads + kv_heads :].reshape(batch, -1)
            return qk[:, :heads], qk[:, heads:].reshape(batch, -1), v
        q = F.linear(h, layer.q, layer.q_bias).view(batch, heads, dim)
        k = F.linear(h, layer.k, layer.k_bias).view(batch, kv_heads, dim)
        q = q * cos + q.roll(half, -1) * sin
        k = k * cos + k.roll(half, -1) * sin
        return q, k.view(batch, -1), F.linear(h, layer.v, layer.v_bias)

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """q [B,H,Lq,D], k/v [B,KVH,Lk,D] -> [B,Lq,H*D] (KV heads repeated as transformers does)."""
        groups = self.heads // self.kv_heads
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.head_dim**-0.5)
        return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)

    def _visible(
        self, q_pos: torch.Tensor, k_pos: torch.Tensor, k_len: torch.Tensor
    ) -> torch.Tensor:
        """Bool mask [B,1,Lq,Lk]: causal, within the request's length, within the sliding window."""
        mask = (k_pos[:, None, :] <= q_pos[:, :, None]) & (k_pos[:, None, :] < k_len[:, None, None])
        if self.sliding_window:
            mask &= k_pos[:, None, :] > q_pos[:, :, None] - self.sliding_window
        return mask[:, None]

    def _logits(self, x_last: torch.Tensor) -> torch.Tensor:
        return F.linear(self._rms(x_last, self.norm), self.lm_head).float()

    # ------------------------------------------------------------------ passes

    def prefill(
        self, tokens: list[list[int]], tables: list[list[int]], kv: PagedKV
    ) -> torch.Tensor:
        """Prompts of unequal length in one padded batch; writes their KV; logits [B, vocab]."""
        lengths = [len(t) for t in tokens]
        batch, longest = len(tokens), max(lengths)
        ids = torch.zeros(batch, longest, dtype=torch.int64)
        for i, t in enumerate(tokens):
            ids[i, : len(t)] = torch.tensor(t)
        ids = ids.to(self.device)
        pos = torch.arange(longest, device=self.device).expand(batch, longest)
        lens = torch.tensor(lengths, device=self.device)
        valid = pos < lens[:, None]
        bases = kv.padded_bases(tables, lengths)[valid]
        mask = self._visible(pos, pos, lens)
        cos, sin = self._rope(pos)
        cos, sin = cos[:, None], sin[:, None]
        x = F.embedding(ids, self.embed)
        for li, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, self._rms(x, layer.ln1))
            q = q.view(batch, longest, self.heads, self.head_dim).transpose(1, 2)
            k = k.view(batch, longest, self.kv_heads, self.head_dim).transpose(1, 2)
            v = v.view(batch, longest, self.kv_heads, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            kv.write(
                li, bases, k.transpose(1, 2)[valid].flatten(1), v.transpose(1, 2)[valid].flatten(1)
            )
            x = x + F.linear(self._attend(q, k, v, mask), layer.o)
            x = x + self._mlp(layer, x)
        last = x[torch.arange(batch, device=self.device), lens - 1]
        return self._logits(last)

    def _decode_rope(self, q_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin [B, 1, head_dim] for ``x * cos + swap_halves(x) * sin``,
        which equals transformers' ``x * cos + rotate_half(x) * sin`` bit for bit."""
        emb = q_pos.to(torch.float32)[:, None, None] * self._inv_freq2
        cos, sin = emb.cos(), emb.sin()
        if self.rope_scaling != 1.0:
            cos, sin = cos * self.rope_scaling, sin * self.rope_scaling
        half = self.head_dim // 2
        sin[..., :half].neg_()
        return cos.to(self.dtype), sin.to(self.dtype)

    def _decode_mask(self, valid: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        """Additive [B, 1, 1, longest]: a decode query at length-1 sees keys < length (and the
        window). Built once per step in the float form attention would convert a bool mask to
        in every layer."""
        if self.sliding_window:
            k_pos = torch.arange(valid.shape[1], device=self.device)
            valid = valid & (k_pos > (lens[:, None] - 1 - self.sliding_window))
        mask = torch.zeros(valid.shape, dtype=self.dtype, device=self.device)
        return mask.masked_fill_(~valid, float("-inf"))[:, None, None]

    def decode(self, tokens: list[int], lengths: list[int], tables: list[list[int]], kv: PagedKV) -> torch.Tensor:  # fmt: skip
        """One new token per request (at position length-1, KV for earlier ones cached).

        Query heads are grouped per KV head ([B, kv_heads, groups, D], the one query position
        standing in the sequence axis), so attention reads each KV head once, no repeat.
        """
        batch, heads, kv_heads, dim = len(tokens), self.heads, self.kv_heads, self.head_dim
        lens = torch.tensor(lengths, device=self.device)
        index = kv.step_index(tables, lengths)
        mask = self._decode_mask(index.valid, lens)
        cos, sin = self._decode_rope(lens - 1)
        scale = dim**-0.5
        x = F.embedding(torch.tensor(tokens, device=self.device), self.embed)
        for li, layer in enumerate(self.layers):
            q, k, v = self._decode_qkv(layer, self._rms(x, layer.ln1), cos, sin)
            kv.write_step(li, index, k, v)
            keys, values = kv.read_step(li, index)
            out = F.scaled_dot_product_attention(
                q.view(batch, kv_heads, heads // kv_heads, dim), keys, values,
                attn_mask=mask, scale=scale,
            )  # fmt: skip
            x = x + F.linear(out.reshape(batch, -1), layer.o)
            x = x + self._mlp(layer, x)
        return self._logits(x)
