"""What a turn's steps report (mixed into ``WorkerService``): engine-step metrics, swap and
preemption counters, GPU energy per model, and the spans each request gets in its own trace
(prefill, KV swap-in, its share of each decode turn) linked to the turn's span.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from aegaeon.gpu_worker.worker_core import TurnState, WorkerCore
from opentelemetry import trace
from opentelemetry.context import Context

from aegaeon import metrics
from aegaeon.protocol import RunTurn, TurnDone
from aegaeon.telemetry import link_to, record_span


class TurnSpans(WorkerCore):
    """Metrics and per-request spans of a turn's steps."""

    def _charge_energy(self, turn: TurnState) -> None:
        """The turn's GPU energy to its model (where NVML counts energy)."""
        if self.energy is None:
            return
        model = turn.command.model
        joules = self.energy.turn_ended(model, sum(turn.tokens.values()))
        if joules is not None:
            metrics.ENERGY.labels(model).inc(joules)
            per_token = self.energy.models[model].per_token
            if per_token is not None:
                metrics.ENERGY_PER_OUTPUT_TOKEN.labels(model).set(per_token)

    def _turn_links(self, command: RunTurn, lead: Context | None) -> list[trace.Link]:
        """Links from the turn to the traces of the batch's other requests (the span itself
        lies in the lead request's trace)."""
        lead_id = trace.get_current_span(lead).get_span_context().trace_id if lead else 0
        links: list[trace.Link] = []
        for rid in command.request_ids:
            held = self.held.get(rid)
            if held is not None and held.trace is not None:
                links += [
                    link for link in link_to(held.trace.context) if link.context.trace_id != lead_id
                ]
        return links

    def _end_turn_spans(self, turn: TurnState, done: TurnDone) -> None:
        """The turn's totals on its span; each request's share of it in the request's trace."""
        command = turn.command
        turn.span.set_attributes(
            {"aegaeon.steps": done.steps, "aegaeon.batch_size": done.batch_size,
             "aegaeon.switch_s": done.switch_s, "aegaeon.preempted": turn.preempted}
        )  # fmt: skip
        if not turn.first_step_ns:
            return
        links = link_to(trace.set_span_in_context(turn.span))
        for rid, tokens in turn.tokens.items():
            traced = turn.traces.get(rid)
            if traced is None:
                continue
            record_span(
                "aegaeon.request.decode_turn", traced.context, turn.first_step_ns,
                turn.last_step_ns,
                {"aegaeon.request_id": rid, "aegaeon.turn_id": command.turn_id,
                 "aegaeon.model": command.model, "aegaeon.quota_s": command.quota_s,
                 "aegaeon.steps": tokens, "aegaeon.batch_size": done.batch_size,
                 "aegaeon.switch_s": done.switch_s},
                links,
            )  # fmt: skip

    def _observe_step(
        self, turn: TurnState, batch: list[str], outputs: Sequence[Any], t0_ns: int,
        elapsed: float, host_free_before: int,
    ) -> None:  # fmt: skip
        """Metrics and per-request spans of one engine step: the prefill of requests new here,
        the swap-in of requests whose KV came back from the host pool."""
        end_ns = time.time_ns()
        turn.first_step_ns = turn.first_step_ns or t0_ns
        turn.last_step_ns = end_ns
        model = turn.command.model
        metrics.ENGINE_STEP.labels(model).observe(elapsed)
        for rid in batch:  # kept for the turn's spans: a request that finished is gone from held
            held = self.held.get(rid)
            if held is not None and held.trace is not None:
                turn.traces[rid] = held.trace
        swapped_in = [rid for rid in batch if rid in self.held and self.held[rid].swapped]
        freed = self.engine.stats().host_kv_bytes_free - host_free_before
        if swapped_in and freed > 0:
            metrics.KV_SWAP_BYTES.labels("in").inc(freed)
        for rid in swapped_in:
            self.held[rid].swapped = False
            self._request_span(turn, "aegaeon.kv_swap", rid, t0_ns, end_ns,
                               {"aegaeon.kv_swap.direction": "in", "aegaeon.kv_swap.bytes": freed,
                                "aegaeon.kv_swap.requests": len(swapped_in)})  # fmt: skip
        for out in outputs:
            turn.tokens[out.request_id] = turn.tokens.get(out.request_id, 0) + 1
            held = self.held.get(out.request_id)
            if held is not None and not held.prefilled:
                held.prefilled = True
                turn.prefilled.append(out.request_id)
                self._request_span(turn, "aegaeon.request.prefill", out.request_id, t0_ns,
                                   end_ns, {"aegaeon.model": model, "aegaeon.batch_size": len(batch)})  # fmt: skip
        for rid in self.engine.last_step_preempted:  # no KV room: it left the device
            metrics.NUM_PREEMPTIONS.labels(model).inc()
            if rid in self.held:
                self.held[rid].swapped = True

    def _request_span(
        self, turn: TurnState, name: str, request_id: str, start_ns: int, end_ns: int,
        attributes: dict[str, Any],
    ) -> None:  # fmt: skip
        held = self.held.get(request_id)
        traced = turn.traces.get(request_id) or (held.trace if held is not None else None)
        if traced is not None:
            attributes = {"aegaeon.request_id": request_id, **attributes}
            record_span(name, traced.context, start_ns, end_ns, attributes)
