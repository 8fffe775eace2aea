"""The native runner for the Llama family (Llama incl. GQA and rope scaling, Qwen2, Mistral,
Qwen3 with its per-head q/k norms, Phi-3 with its fused projections).

It computes what transformers' modeling code computes, in the same order (so fp32 logits agree
within 1e-4), but over the paged KV region and with tensors that are views into the arena:

    x = embed(tokens)
    for each layer:  x += o(attn(rope(q(rms(x))), rope(k(rms(x))), v(rms(x))))   (K, V paged)
                     (Qwen3: q and k each RMS-normed per head before the rope)
                     x += down(silu(gate(rms(x))) * up(rms(x)))
    logits = lm_head(rms(x)[last position of each request])

Each layer belongs to an attention kind (its sliding window and rope); the embedding, the norm,
the attention call and the logits are methods a subclass overrides (runners/gemma.py).
One instance per architecture is created once; ``bind`` points it at another model's weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from aegaeon.gpu_worker.paged_kv import PagedKV, StepInputs
from aegaeon.gpu_worker.weights_loader import activation
from torch.nn.attention import SDPBackend, sdpa_kernel


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
    qk_norm: torch.Tensor | None = None  # Qwen3: [heads + kv_heads, D], q's rows then k's
    post_attn_norm: torch.Tensor | None = None  # Gemma 2/3: each sublayer's output is normed
    post_mlp_norm: torch.Tensor | None = None  # before its residual add
    kind: int = 0  # index into the runner's attention kinds (window and rope)

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


@dataclass
class AttentionKind:
    """What the layers of one attention kind share: the sliding window and the rope.

    The Llama family has one kind; Gemma 2 and 3 interleave local (windowed) and global layers,
    and Gemma 3's local layers rotate with their own rope base.
    """

    window: int | None
    inv_freq: torch.Tensor
    rope_scaling: float
    inv_freq2: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        # cat(freqs, freqs) == positions * cat(inv_freq, inv_freq): one op per step instead of two
        self.inv_freq2 = torch.cat((self.inv_freq, self.inv_freq))


def rope_inv_freq(
    config: Any, device: torch.device, layer_type: str | None = None
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling, exactly as transformers computes them
    (``layer_type``: the entry of a per-layer-type ``rope_parameters``, as in Gemma 3)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(config, "rope_parameters", None) or {}
    if layer_type is not None:
        params = params[layer_type]
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        per_type = {"layer_type": layer_type} if layer_type is not None else {}
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, device, **per_type)
        return inv_freq.float(), float(scaling)
    base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    exponents = (
        torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim
    )
    return 1.0 / (base**exponents), 1.0


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "relu": F.relu,
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
}
"""MLP activations by their transformers name (``gelu_pytorch_tanh``: Gemma's)."""


PLANLESS_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
"""SDPA's kernels without cuDNN's: cuDNN builds an execution plan for every new sequence length,
and a decode's lengths grow each step. On an H200 (torch 2.11) that plan cost 7.8 ms of CPU per
attention call, four times a whole decode step of the other work."""


def attention_kernels(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """The context every forward pass on ``device`` runs in (see ``PLANLESS_ATTENTION``)."""
    return sdpa_kernel(PLANLESS_ATTENTION) if device.type == "cuda" else contextlib.nullcontext()


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
        self.scale = self.head_dim**-0.5
        self.act = ACTIVATIONS[activation(c)]
        self.kinds, kind_of_layer = self._attention_kinds(c)
        self._eps = torch.tensor(self.eps, dtype=torch.float32, device=self.device)
        self.embed = tensors["model.embed_tokens.weight"]
        self.norm = tensors["model.norm.weight"]
        self.lm_head = (
            tensors.get("lm_head.weight", self.embed) if not c.tie_word_embeddings else self.embed
        )
        self.layers = [
            self._layer(tensors, f"model.layers.{i}.") for i in range(c.num_hidden_layers)
        ]
        for layer, kind in zip(self.layers, kind_of_layer, strict=True):
            layer.kind = kind

    def _attention_kinds(self, config: Any) -> tuple[list[AttentionKind], list[int]]:
        """The attention kinds and each layer's kind (here: one kind for every layer)."""
        c = config
        window = getattr(c, "sliding_window", None) if getattr(c, "use_sliding_window", True) else None  # fmt: skip
        kind = AttentionKind(window, *rope_inv_freq(c, self.device))
        return [kind], [0] * c.num_hidden_layers

    def _layer(self, t: dict[str, torch.Tensor], p: str) -> _Layer:
        a, m = p + "self_attn.", p + "mlp."
        if a + "qkv_proj.weight" in t:  # Phi-3: row slices of the fused matrices are views
            q_rows, kv_rows = self.heads * self.head_dim, self.kv_heads * self.head_dim
            q, k, v = t[a + "qkv_proj.weight"].split([q_rows, kv_rows, kv_rows])
            gate, up = t[m + "gate_up_proj.weight"].chunk(2)
        else:
            q, k, v = t[a + "q_proj.weight"], t[a + "k_proj.weight"], t[a + "v_proj.weight"]
            gate, up = t[m + "gate_proj.weight"], t[m + "up_proj.weight"]
        layer = _Layer(
            t[p + "input_layernorm.weight"], t[p + "post_attention_layernorm.weight"],
            q, k, v, t[a + "o_proj.weight"], gate, up, t[m + "down_proj.weight"],
            t.get(a + "q_proj.bias"), t.get(a + "k_proj.bias"), t.get(a + "v_proj.bias"),
        )  # fmt: skip
        if a + "q_norm.weight" in t:  # one weight per head row, so q and k norm in one op
            q_norm = t[a + "q_norm.weight"].expand(self.heads, -1)
            layer.qk_norm = torch.cat((q_norm, t[a + "k_norm.weight"].expand(self.kv_heads, -1)))
        return layer

    # ------------------------------------------------------------------ building blocks

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """transformers' RMSNorm (mean of squares in float32) in fewer, cheaper ops: the mean is
        a sum scaled by 1/n inside the eps add (``mean`` costs several small ops on the CPU)."""
        h = x if x.dtype == torch.float32 else x.to(torch.float32)
        squares = torch.mul(h, h).sum(-1, keepdim=True)
        h = h * torch.add(self._eps, squares, alpha=1.0 / h.shape[-1]).rsqrt_()
        return weight * (h if x.dtype == torch.float32 else h.to(x.dtype))

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.embed)

    def _rope(
        self, positions: torch.Tensor, kind: AttentionKind
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for positions of any shape S -> [*S, head_dim] (float32 math, as in HF)."""
        freqs = positions.to(torch.float32)[..., None] * kind.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * kind.rope_scaling).to(self.dtype)
        return cos, (emb.sin() * kind.rope_scaling).to(self.dtype)

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
            out = F.linear(self.act(gate_up[..., :inter]) * gate_up[..., inter:], layer.down)
        else:
            out = F.linear(self.act(F.linear(h, layer.gate)) * F.linear(h, layer.up), layer.down)
        return out if layer.post_mlp_norm is None else self._rms(out, layer.post_mlp_norm)

    def _attn_out(self, layer: _Layer, attn: torch.Tensor) -> torch.Tensor:
        """Attention's contribution to the residual stream: o(attn), post-normed where set."""
        out = F.linear(attn, layer.o)
        return out if layer.post_attn_norm is None else self._rms(out, layer.post_attn_norm)

    def _decode_qkv(
        self, layer: _Layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated q [B, heads, D] and k [B, kv_heads * D], and v [B, kv_heads * D]."""
        batch, heads, kv_heads, dim, half = h.shape[0], self.heads, self.kv_heads, self.head_dim, self.head_dim // 2  # fmt: skip
        if layer.qkv is not None:  # one matmul, and q and k rotated together
            qkv = F.linear(h, layer.qkv, layer.qkv_bias).view(batch, heads + 2 * kv_heads, dim)
            qk = qkv[:, : heads + kv_heads]
            if layer.qk_norm is not None:
                qk = self._rms(qk, layer.qk_norm)
            qk = qk * cos + qk.roll(half, -1) * sin
            v = qkv[:, heads + kv_heads :].reshape(batch, -1)
            return qk[:, :heads], qk[:, heads:].reshape(batch, -1), v
        q = F.linear(h, layer.q, layer.q_bias).view(batch, heads, dim)
        k = F.linear(h, layer.k, layer.k_bias).view(batch, kv_heads, dim)
        if layer.qk_norm is not None:
            q, k = self._rms(q, layer.qk_norm[:heads]), self._rms(k, layer.qk_norm[heads:])
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
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)

    def _decode_attend(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """q [B, kv_heads, groups, D] against keys/values [B, kv_heads, longest, D]."""
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale)

    def _visible(
        self, q_pos: torch.Tensor, k_pos: torch.Tensor, k_len: torch.Tensor, window: int | None
    ) -> torch.Tensor:
        """Bool mask [B,1,Lq,Lk]: causal, within the request's length, within the sliding window."""
        mask = (k_pos[:, None, :] <= q_pos[:, :, None]) & (k_pos[:, None, :] < k_len[:, None, None])
        if window:
            mask &= k_pos[:, None, :] > q_pos[:, :, None] - window
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
        masks = [self._visible(pos, pos, lens, kind.window) for kind in self.kinds]
        ropes = [self._rope(pos[:, None], kind) for kind in self.kinds]  # [B, 1, L, D]
        x = self._embed(ids)
        for li, layer in enumerate(self.layers):
            cos, sin = ropes[layer.kind]
            q, k, v = self._qkv(layer, self._rms(x, layer.ln1))
            q = q.view(batch, longest, self.heads, self.head_dim)
            k = k.view(batch, longest, self.kv_heads, self.head_dim)
            if layer.qk_norm is not None:
                q = self._rms(q, layer.qk_norm[: self.heads])
                k = self._rms(k, layer.qk_norm[self.heads :])
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            v = v.view(batch, longest, self.kv_heads, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            kv.write(
                li, bases, k.transpose(1, 2)[valid].flatten(1), v.transpose(1, 2)[valid].flatten(1)
            )
            x = x + self._attn_out(layer, self._attend(q, k, v, masks[layer.kind]))
            x = x + self._mlp(layer, x)
        last = x[torch.arange(batch, device=self.device), lens - 1]
        return self._logits(last)

    def _decode_rope(
        self, q_pos: torch.Tensor, kind: AttentionKind
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin [B, 1, head_dim] for ``x * cos + swap_halves(x) * sin``,
        which equals transformers' ``x * cos + rotate_half(x) * sin`` bit for bit."""
        emb = q_pos.to(torch.float32)[:, None, None] * kind.inv_freq2
        cos, sin = emb.cos(), emb.sin()
        if kind.rope_scaling != 1.0:
            cos, sin = cos * kind.rope_scaling, sin * kind.rope_scaling
        half = self.head_dim // 2
        sin[..., :half].neg_()
        return cos.to(self.dtype), sin.to(self.dtype)

    def _decode_mask(
        self, valid: torch.Tensor, lens: torch.Tensor, window: int | None
    ) -> torch.Tensor:
        """Additive [B, 1, 1, longest]: a decode query at length-1 sees keys < length (and the
        window). Built once per step in the float form attention would convert a bool mask to
        in every layer."""
        if window:
            k_pos = torch.arange(valid.shape[1], device=self.device)
            valid = valid & (k_pos > (lens[:, None] - 1 - window))
        mask = torch.zeros(valid.shape, dtype=self.dtype, device=self.device)
        return mask.masked_fill_(~valid, float("-inf"))[:, None, None]

    def decode(self, tokens: list[int], lengths: list[int], tables: list[list[int]], kv: PagedKV) -> torch.Tensor:  # fmt: skip
        """One new token per request (at position length-1, KV for earlier ones cached)."""
        return self.decode_step(kv.step_inputs(tokens, lengths, tables).to(self.device), kv)

    def decode_step(self, step: StepInputs, kv: PagedKV) -> torch.Tensor:
        """``decode`` from the step's device tensors: tensor operations only, no host sync, so
        a CUDA graph captures it (runners/cuda_graphs.py).

        Query heads are grouped per KV head ([B, kv_heads, groups, D], the one query position
        standing in the sequence axis), so attention reads each KV head once, no repeat.
        """
        batch, heads, kv_heads, dim = step.tokens.shape[0], self.heads, self.kv_heads, self.head_dim
        lens = step.lengths
        index = kv.step_index(step)
        masks = [self._decode_mask(index.valid, lens, kind.window) for kind in self.kinds]
        ropes = [self._decode_rope(lens - 1, kind) for kind in self.kinds]
        x = self._embed(step.tokens)
        for li, layer in enumerate(self.layers):
            cos, sin = ropes[layer.kind]
            q, k, v = self._decode_qkv(layer, self._rms(x, layer.ln1), cos, sin)
            kv.write_step(li, index, k, v)
            keys, values = kv.read_step(li, index)
            grouped = q.view(batch, kv_heads, heads // kv_heads, dim)
            out = self._decode_attend(grouped, keys, values, masks[layer.kind])
            x = x + self._attn_out(layer, out.reshape(batch, -1))
            x = x + self._mlp(layer, x)
        return self._logits(x)
