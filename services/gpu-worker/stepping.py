"""Stepping: one token for each request of a batch of the resident model — prefill, decode,
sampling (DESIGN.md §5). Mixed into ``Engine`` on top of ``Preemption``, which makes room."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from aegaeon.gpu_worker.kv_cache import blocks_needed
from aegaeon.gpu_worker.preemption import Preemption
from aegaeon.gpu_worker.requests import Request, TokenOutput
from aegaeon.gpu_worker.runners.fallback import FallbackRunner
from aegaeon.gpu_worker.runners.llama import LlamaRunner
from aegaeon.gpu_worker.sampler import choose, finish_reason, is_plain_greedy


class Stepping(Preemption):
    """``step``: prefill new requests, decode the others, sample one token each."""

    _native: dict[str, LlamaRunner]  # one skeleton per architecture
    _fallback: FallbackRunner
    _clock: int
    abort: Callable[[str], None]  # Engine's: forgets a finished request

    def step(self, request_ids: Sequence[str]) -> list[TokenOutput]:
        """One token for each given request of the resident model (see the module docstring)."""
        self.last_step_preempted = []
        batch = [self._requests[rid] for rid in request_ids]
        for request in batch:
            if request.model != self.slots.resident_model:
                raise ValueError(f"request {request.request_id!r} is for {request.model!r}, resident is {self.slots.resident_model!r}")  # fmt: skip
        if not batch:
            return []
        self._clock += 1
        with torch.inference_mode():
            if self.specs[batch[0].model].kind == "fallback":
                logits = self._fallback_step(batch)
            else:
                batch = self._make_room(batch)
                logits = self._native_step(batch)
            return self._sample(batch, logits)

    def _native_step(self, batch: list[Request]) -> torch.Tensor:
        kv = self._paged_kv(batch[0].model)
        # Swap-ins run on their own stream while the prefill (which needs none of them) computes.
        self._start_swap_in([r for r in batch if r.host is not None])
        prefill = [r for r in batch if not r.blocks]
        for request in batch:
            grow = blocks_needed(len(request.tokens), kv.block_size) - len(request.blocks)
            if grow > 0:
                request.blocks += self.slabs.allocate(kv.block_elems, grow)
        runner = self._native[self.specs[batch[0].model].hf_config.model_type]
        if len(prefill) == len(batch):
            return runner.prefill([r.tokens for r in batch], [r.blocks for r in batch], kv)
        if not prefill:
            self._finish_swap_in()
            lengths = [len(r.tokens) for r in batch]
            return runner.decode(
                [r.tokens[-1] for r in batch], lengths, [r.blocks for r in batch], kv
            )
        rows: dict[str, torch.Tensor] = {}
        if prefill:
            logits = runner.prefill([r.tokens for r in prefill], [r.blocks for r in prefill], kv)
            rows.update({r.request_id: logits[i] for i, r in enumerate(prefill)})
        decode = [r for r in batch if r.request_id not in rows]
        self._finish_swap_in()
        if decode:
            lengths = [len(r.tokens) for r in decode]
            logits = runner.decode(
                [r.tokens[-1] for r in decode], lengths, [r.blocks for r in decode], kv
            )
            rows.update({r.request_id: logits[i] for i, r in enumerate(decode)})
        return torch.stack([rows[r.request_id] for r in batch])

    def _fallback_step(self, batch: list[Request]) -> torch.Tensor:
        self._swap_in([r for r in batch if r.host is not None])
        rows = []
        for request in batch:
            if request.fallback_kv is None:
                logits, request.fallback_kv = self._fallback.forward(request.tokens, None)
            else:
                logits, request.fallback_kv = self._fallback.forward(
                    request.tokens[-1:], request.fallback_kv
                )
            rows.append(logits)
        return torch.stack(rows)

    def _sample(self, batch: list[Request], logits: torch.Tensor) -> list[TokenOutput]:
        greedy = [i for i, r in enumerate(batch) if is_plain_greedy(r.sampling)]
        rows = logits if len(greedy) == len(batch) else logits[greedy]  # list indexing is slow
        picks = dict(zip(greedy, rows.argmax(-1).tolist(), strict=True)) if greedy else {}
        outputs = []
        eos = {r.model: self.specs[r.model].eos_token_ids for r in batch}
        for i, request in enumerate(batch):
            if i in picks:
                token, logprob, top = picks[i], None, []
            else:
                choice = choose(logits[i], request.sampling, request.outputs, request.seed)
                token, logprob, top = choice.token_id, choice.logprob, choice.top_logprobs
            request.outputs.append(token)
            request.last_used = self._clock
            reason = finish_reason(
                token, len(request.outputs), request.sampling, eos[request.model]
            )
            outputs.append(
                TokenOutput(
                    request.request_id, len(request.outputs) - 1, token, logprob, top, reason
                )
            )
            if reason is not None:
                self.abort(request.request_id)
        return outputs
