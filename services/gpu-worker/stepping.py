"""Stepping: one token for each request of a batch of the resident model — prefill, decode,
sampling (DESIGN.md §5). Mixed into ``Engine`` on top of ``Preemption``, which makes room.

A failure is the failing request's alone: a draw that raises fails only its request, and a
batch whose forward pass raises is run again one request at a time, so that only the request
that still fails alone ends (with an ``error`` output) while the others get their token. The
failed forward is rolled back first (blocks it gave to prefills are returned), so the retry
computes exactly what the batch would have.

A request whose KV was dropped (host pool full) or that was recovered from its tokens so far
gets its KV back by *replay* in half precision: its prompt's prefill, then one decode step per
token it had produced — the very operations that built the KV the first time. One prefill over
prompt and outputs would be faster, but attention over a longer query block rounds differently
from a one-token decode (seen on AVX2 CPUs in bf16: a K/V bit flipped in the next layer, then a
token), so only replay keeps the tokens bitwise those of the uninterrupted run. In float32 the
one prefill is kept: its rounding differences stay far below a greedy near-tie.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from aegaeon.gpu_worker.kv_cache import blocks_needed
from aegaeon.gpu_worker.paged_kv import PagedKV
from aegaeon.gpu_worker.preemption import Preemption
from aegaeon.gpu_worker.requests import Request, TokenOutput
from aegaeon.gpu_worker.runners.cuda_graphs import DecodeGraphs
from aegaeon.gpu_worker.runners.fallback import FallbackRunner
from aegaeon.gpu_worker.runners.llama import LlamaRunner, attention_kernels
from aegaeon.gpu_worker.sampler import choose, finish_reason, is_plain_greedy

log = logging.getLogger(__name__)


class Stepping(Preemption):
    """``step``: prefill new requests, decode the others, sample one token each."""

    _native: dict[str, LlamaRunner]  # one skeleton per architecture
    _fallback: FallbackRunner
    graphs: DecodeGraphs  # decode steps through CUDA graphs where they apply
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
        with torch.inference_mode(), attention_kernels(self.device):
            try:
                if self.specs[batch[0].model].kind == "fallback":
                    logits = self._fallback_step(batch)
                else:
                    batch = self._make_room(batch)
                    logits = self._native_step(batch)
            except Exception as exc:
                if len(batch) == 1:
                    return [self._fail(batch[0], exc)]
                log.warning("a batch of %d failed (%s): each request alone", len(batch), exc)
                return self._step_each(batch)
            return self._sample(batch, logits)

    def _step_each(self, batch: list[Request]) -> list[TokenOutput]:
        outputs, preempted = [], list(self.last_step_preempted)
        for request in batch:
            outputs += self.step([request.request_id])
            preempted += self.last_step_preempted
        self.last_step_preempted = preempted
        return outputs

    def _fail(self, request: Request, exc: Exception) -> TokenOutput:
        """End one request with an error output (no token); the engine forgets it."""
        log.exception("request %s failed", request.request_id, exc_info=exc)
        self.abort(request.request_id)
        error = f"{type(exc).__name__}: {exc}"
        return TokenOutput(request.request_id, len(request.outputs), -1, None, [], "error", error)

    def _native_step(self, batch: list[Request]) -> torch.Tensor:
        kv = self._paged_kv(batch[0].model)
        # Swap-ins run on their own stream while the prefill (which needs none of them) computes.
        self._start_swap_in([r for r in batch if r.host is not None])
        prefill = [r for r in batch if not r.blocks]
        try:
            for request in batch:
                grow = blocks_needed(len(request.tokens), kv.block_size) - len(request.blocks)
                if grow > 0:
                    request.blocks += self.slabs.allocate(kv.block_elems, grow)
            return self._native_forward(batch, prefill, kv)
        except Exception:
            # Undone so that a retry sees the same work: a prefill whose forward failed has no
            # KV in its blocks (keeping them would make it look decoded). Swap-ins completed.
            self._finish_swap_in()
            for request in prefill:
                self._free_device(request)
            raise

    @property
    def _replays(self) -> bool:
        """Whether dropped KV is rebuilt by replay (half precision; see the module docstring)."""
        return self.dtype != torch.float32

    def _native_forward(
        self, batch: list[Request], prefill: list[Request], kv: PagedKV
    ) -> torch.Tensor:
        runner = self._native[self.specs[batch[0].model].hf_config.model_type]
        replayed = {r.request_id: self._replay(runner, r, kv)
                    for r in prefill if r.outputs and self._replays}  # fmt: skip
        if not replayed:
            return self._native_batch(runner, batch, prefill, kv)
        rest = [r for r in batch if r.request_id not in replayed]
        if rest:
            fresh = [r for r in prefill if r.request_id not in replayed]
            logits = self._native_batch(runner, rest, fresh, kv)
            replayed.update({r.request_id: logits[i] for i, r in enumerate(rest)})
        return torch.stack([replayed[r.request_id] for r in batch])

    def _replay(self, runner: LlamaRunner, request: Request, kv: PagedKV) -> torch.Tensor:
        """Rebuild a request's KV as it was first built — its prompt's prefill, then a decode step
        per token it produced — and return the logits after its last token."""
        logits = runner.prefill([request.prompt], [request.blocks], kv)
        tokens = request.tokens
        for length in range(len(request.prompt) + 1, len(tokens) + 1):
            logits = self.graphs.decode(
                runner, [tokens[length - 1]], [length], [request.blocks], kv
            )
        return logits[0]

    def _native_batch(
        self, runner: LlamaRunner, batch: list[Request], prefill: list[Request], kv: PagedKV
    ) -> torch.Tensor:
        if len(prefill) == len(batch):
            return runner.prefill([r.tokens for r in batch], [r.blocks for r in batch], kv)
        if not prefill:
            self._finish_swap_in()
            lengths = [len(r.tokens) for r in batch]
            return self.graphs.decode(
                runner, [r.tokens[-1] for r in batch], lengths, [r.blocks for r in batch], kv
            )
        rows: dict[str, torch.Tensor] = {}
        if prefill:
            logits = runner.prefill([r.tokens for r in prefill], [r.blocks for r in prefill], kv)
            rows.update({r.request_id: logits[i] for i, r in enumerate(prefill)})
        decode = [r for r in batch if r.request_id not in rows]
        self._finish_swap_in()
        if decode:
            lengths = [len(r.tokens) for r in decode]
            logits = self.graphs.decode(
                runner, [r.tokens[-1] for r in decode], lengths, [r.blocks for r in decode], kv
            )
            rows.update({r.request_id: logits[i] for i, r in enumerate(decode)})
        return torch.stack([rows[r.request_id] for r in batch])

    def _fallback_step(self, batch: list[Request]) -> torch.Tensor:
        self._swap_in([r for r in batch if r.host is not None])
        rows, caches = [], []
        for request in batch:
            past = request.fallback_kv
            if past is None and request.outputs and self._replays:  # see the module docstring
                logits, past = self._fallback.forward(request.prompt, None)
                for token in request.outputs[:-1]:
                    logits, past = self._fallback.forward([token], past)
            logits, cache = self._fallback.forward(
                request.tokens[-1:] if past else request.tokens, past
            )
            rows.append(logits)
            caches.append(cache)
        # Kept only once every request's forward passed (the cache grows into new tensors), so a
        # failed batch leaves every request's cache as it was for the retry.
        for request, cache in zip(batch, caches, strict=True):
            request.fallback_kv = cache
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
                try:
                    choice = choose(logits[i], request.sampling, request.outputs, request.seed)
                except Exception as exc:  # this request's sampling values: its failure alone
                    outputs.append(self._fail(request, exc))
                    continue
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
