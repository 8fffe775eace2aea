"""The gpu-worker's NATS shell: commands in, engine steps, tokens and events out.

The engine is synchronous torch code and is only ever touched from one thread (``_engine_thread``).
An asyncio coroutine drives a turn one step at a time, so commands (abort, preempt) that arrive
mid-turn land between two steps — at a token boundary — without a message per token::

    RunTurn ──► ensure weights cached ──► switch_to(model) ──► step ─┬─► publish TokenBatch per gateway
                                                                     ├─► append tokens to Redis (recovery)
                                        quota / empty / preempt ◄────┘
                                        ──► swap_out (if asked) ──► TurnDone

The state and the engine's thread are ``WorkerCore``'s (worker_core.py); switches, host-cache
loads and prefetch are ``Residency``'s (residency.py); step metrics and request spans are
``TurnSpans``' (turn_spans.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aegaeon.gpu_worker.delivery import CLIENT_ERROR, HeldRequest
from aegaeon.gpu_worker.energy import energy_meter
from aegaeon.gpu_worker.handoff import KVHandoff
from aegaeon.gpu_worker.residency import Residency
from aegaeon.gpu_worker.turn_spans import TurnSpans
from aegaeon.gpu_worker.worker_core import HEARTBEAT_INTERVAL_S, EngineStep, TurnState
from opentelemetry.context import Context

from aegaeon import metrics
from aegaeon.bus import context_from
from aegaeon.protocol import (
    AbortRequest,
    AssignRequest,
    Drain,
    EvictModel,
    Heartbeat,
    Preempt,
    PrefetchModel,
    RequestDone,
    RunTurn,
    TokenBatch,
    TokenEvent,
    TurnDone,
    WorkerCommand,
    WorkerError,
)
from aegaeon.telemetry import RequestTrace, tracer

log = logging.getLogger(__name__)
_tracer = tracer(__name__)


class WorkerService(Residency, TurnSpans, KVHandoff):
    """One worker: an Engine behind NATS. Build with ``WorkerService(...)``, then ``await run()``."""

    # ------------------------------------------------------------------ plumbing

    async def run(self) -> None:
        """Serve until ``stop()``: heartbeats, the command loop, the subscription."""
        self.energy = energy_meter(str(self.engine.stats().device))
        if self.kv_transfer_address:
            await self._start_kv_server(self.kv_transfer_address)
        sub = await self.bus.subscribe(
            self.subjects.worker_cmd(self.worker_id), WorkerCommand, self._on_command
        )
        tasks = [
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
            asyncio.create_task(self._command_loop(), name="commands"),
            asyncio.create_task(self._release_stale_mappings_loop(), name="mapping sweep"),
        ]
        log.info("worker %s ready (%s)", self.worker_id, self.engine.stats())
        await self._stopped.wait()
        await sub.unsubscribe()
        # Prefetches too: one still waiting for the model-store would otherwise ask the engine
        # thread for a copy after it shut down, and outlive the worker.
        tasks += self._prefetch_tasks
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._publish_heartbeat(draining=True)
        await self._stop_kv_server()
        self._engine_thread.shutdown(wait=True)

    def stop(self) -> None:
        self._stopped.set()

    async def drain(self) -> None:
        """Graceful exit: take no new turns, let the current one end, then stop. Requests still
        held are re-run elsewhere by the scheduler from their prompt plus the tokens sent."""
        self.draining = True
        await self._publish_heartbeat(draining=True)
        while self.turn is not None:
            await asyncio.sleep(0.02)
        self.stop()

    async def _on_command(self, command: Any, msg: Any) -> None:
        if not self._fence.admits(msg.headers):
            log.warning("dropped %s from an older scheduler term than %d (a deposed leader)",
                        type(command).__name__, self._fence.newest)  # fmt: skip
            return
        # Preempt and PrefetchModel must not wait behind a running turn: one raises a flag, the
        # other starts a background copy that is meant to overlap that turn.
        if isinstance(command, PrefetchModel):
            # Newer than the choice of the turn running or queued (one at a time per worker).
            self._restaged_for = self._turn_in_hand()
            self._start_prefetch(command.model)
            return
        if isinstance(command, Preempt):
            if self.turn and (command.turn_id in (None, self.turn.command.turn_id)):
                self.turn.preempted = True
            return
        if isinstance(command, RunTurn):
            self._queued_turn = command.turn_id
        await self._commands.put((command, context_from(msg)))

    async def _command_loop(self) -> None:
        # Each handler gets the trace context its message carried.
        handlers: dict[type, Callable[[Any, Context], Awaitable[None]]] = {
            AssignRequest: self._assign,
            RunTurn: self._run_turn,
            AbortRequest: lambda c, _ctx: self._abort(c),
            Drain: lambda _c, _ctx: self.drain(),
            EvictModel: lambda c, _ctx: self._evict(c.model),
        }
        while True:
            command, context = await self._commands.get()
            try:
                await handlers[type(command)](command, context)
            except Exception as exc:
                log.exception("command %s failed", type(command).__name__)
                await self._report_error(command, exc)

    # ------------------------------------------------------------------ heartbeats

    async def _heartbeat_loop(self) -> None:
        while True:
            await self._publish_heartbeat(draining=self.draining)
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)

    async def _publish_heartbeat(self, draining: bool) -> None:
        # Reads plain counters from the engine without its thread: a long switch must not
        # delay the heartbeat, or the scheduler would think this worker dead.
        stats = self.engine.stats()
        self._sample_gauges(stats)
        beat = Heartbeat(
            worker_id=self.worker_id,
            device=str(stats.device),
            role=self.role,
            time=time.time(),
            incarnation=self.incarnation,
            node=self.node,
            resident_model=self.engine.resident_model,
            arena_bytes=stats.arena_bytes,
            weight_budget_bytes=stats.weight_budget_bytes,
            slot_bytes=stats.slot_bytes,
            kv_block_size=stats.block_size,
            kv_blocks_total=stats.kv_blocks_total,
            kv_blocks_free=stats.kv_blocks_free,
            host_kv_bytes_free=stats.host_kv_bytes_free,
            num_requests=len(self.held),
            draining=draining,
            turn_id=self.turn.command.turn_id if self.turn else self._queued_turn,
            kv_endpoint=self.kv_endpoint,
        )
        try:
            await self.bus.publish(self.subjects.heartbeat, beat)
        except Exception as exc:  # NATS reconnecting: the next beat will go through
            log.debug("heartbeat not sent: %s", exc)

    # ------------------------------------------------------------------ commands

    def _sample_gauges(self, stats: Any) -> None:
        """KV use, the resident model and (on CUDA) NVML's view of this worker's GPU."""
        total = stats.kv_blocks_total
        usage = 1.0 - stats.kv_blocks_free / total if total > 0 else 0.0
        metrics.KV_CACHE_USAGE.labels(self.worker_id).set(usage)
        resident = self.engine.resident_model
        for model in {*self.registered, *([resident] if resident else [])}:
            metrics.RESIDENT_MODELS.labels(self.worker_id, model).set(int(model == resident))
        if str(stats.device).startswith("cuda"):
            index = str(stats.device).split()[0].partition(":")[2] or "0"
            metrics.sample_gpus([int(index)])

    async def _assign(self, command: AssignRequest, context: Context | None = None) -> None:
        if command.request_id in self.held:
            return  # a repeated assign (scheduler retry) changes nothing
        if command.model not in self.registered:
            await self._ensure_model(command.model)
        args = (
            command.request_id,
            command.model,
            list(command.prompt_token_ids),
            command.sampling,
            list(command.output_token_ids),
        )
        traced = RequestTrace(context) if context is not None else None
        imported = command.kv is not None and await self._import_kv(command, args, traced)
        if not imported:
            await self._on_engine(self.engine.add_request, *args)
        self.held[command.request_id] = HeldRequest(
            command.request_id,
            command.model,
            command.gateway_id,
            len(command.output_token_ids),
            traced,
            # An imported KV lies in the host pool: the next step swaps it in, no prefill.
            prefilled=imported,
            swapped=imported,
        )

    async def _abort(self, command: AbortRequest) -> None:
        held = self.held.pop(command.request_id, None)
        if held is None:
            return
        await self._on_engine(self.engine.abort, command.request_id)
        self._withdraw_kv(command.request_id)
        await self.bus.publish(
            self.subjects.worker_events(self.worker_id),
            RequestDone(self.worker_id, command.request_id, "abort", held.produced),
        )

    async def _run_turn(self, command: RunTurn, context: Context | None = None) -> None:
        turn = self.turn = TurnState(command)
        if self.energy is not None:
            self.energy.turn_started()
        if self._queued_turn == command.turn_id:
            self._queued_turn = None
        done = TurnDone(self.worker_id, command.turn_id, command.model, steps=0, elapsed_s=0.0)
        with _tracer.start_as_current_span(
            "aegaeon.turn", context=context, links=self._turn_links(command, context),
            attributes={"aegaeon.turn_id": command.turn_id, "aegaeon.worker_id": self.worker_id,
                        "aegaeon.model": command.model, "aegaeon.quota_s": command.quota_s},
        ) as turn.span:  # fmt: skip
            try:
                if command.pinned != self._pinned:  # before the switch, which must keep it
                    await self._on_engine(self.engine.pin, command.pinned)
                    self._pinned = command.pinned
                for rid in command.drop_kv:  # before the switch, as an unloading instance would
                    await self._drop_kv(rid)
                switch = await self._switch(command.model, command.request_ids)
                if switch is not None:
                    done.switch_s, done.switch_bytes = float(switch.seconds), int(switch.bytes)
                    done.prefetched_bytes = int(switch.prefetched_bytes)
                restaged = self._restaged_for == command.turn_id
                if (
                    command.prefetch_model
                    and command.prefetch_model != command.model
                    and not restaged
                ):
                    self._start_prefetch(command.prefetch_model)
                await self._step_until_turn_ends(turn, done)
                if command.swap_out_after:
                    await self._swap_out(turn, done)
                if command.export_kv:
                    await self._export_kv(command, done)
            finally:
                done.elapsed_s = time.monotonic() - turn.started
                done.progress = {rid: h.produced for rid, h in self.held.items()}
                done.prefilled = turn.prefilled
                self.turn = None
                self._charge_energy(turn)
                self._end_turn_spans(turn, done)
                await self.delivery.flush()
                await self.bus.publish(self.subjects.worker_events(self.worker_id), done)

    async def _drop_kv(self, request_id: str) -> None:
        held = self.held.get(request_id)
        if held is None:
            return
        await self._on_engine(self.engine.drop_kv, request_id)
        held.prefilled = held.swapped = False  # its next step here is a prefill again

    async def _step_until_turn_ends(self, turn: TurnState, done: TurnDone) -> None:
        """Step the turn's batch until its quota, its ``max_steps`` or a Preempt ends it, or it
        empties. A step's delivery (tokens to NATS, Redis) runs while the next step computes:
        the next step needs only to know which requests ended, and the outputs say that, so the
        engine does not wait for the wire and the wire not for the engine. Each step computes
        what it would have without the overlap, so tokens are unchanged; a Preempt or an abort
        that comes during a delivery takes effect one step later."""
        command = turn.command
        batch = [rid for rid in command.request_ids if rid in self.held]
        done.batch_size = len(batch)
        step = self._start_step(batch) if self._may_step(batch, turn, done, None) else None
        first_step_at: float | None = None
        outputs_at = 0.0
        while step is not None:
            outputs = await step.outputs
            now = time.monotonic()
            self._observe_step(turn, step.batch, outputs, step.t0_ns, now - step.t0, step.host_free)
            done.steps += 1
            # What a step costs the turn: the first, from its start; each later one, the time
            # since the previous step's tokens (the pace the batch's tokens really come at).
            if first_step_at is None:
                first_step_at = step.t0  # the quota runs from the first step, after the switch
                done.prefill_s += now - step.t0
            else:
                done.decode_s += now - outputs_at
            outputs_at = now
            ended = {o.request_id for o in outputs if o.finish_reason or o.error is not None}
            batch = [rid for rid in step.batch if rid in self.held and rid not in ended]
            step = (
                self._start_step(batch)
                if self._may_step(batch, turn, done, first_step_at)
                else None
            )
            try:
                done.finished.extend(await self.delivery.deliver(outputs))
            except BaseException:
                if step is not None:  # settle the engine before the error unwinds the turn
                    await asyncio.gather(step.outputs, return_exceptions=True)
                raise

    def _may_step(
        self, batch: list[str], turn: TurnState, done: TurnDone, first_step_at: float | None
    ) -> bool:
        """Whether the turn takes another step now."""
        command = turn.command
        if not batch or turn.preempted or (command.prefill_only and done.steps > 0):
            return False
        if command.max_steps is not None and done.steps >= command.max_steps:
            return False
        return first_step_at is None or time.monotonic() - first_step_at < command.quota_s

    def _start_step(self, batch: list[str]) -> EngineStep:
        """One engine step of ``batch`` on the engine's thread, started now."""
        host_free = self.engine.stats().host_kv_bytes_free  # the engine is idle between steps
        t0, t0_ns = time.monotonic(), time.time_ns()
        return EngineStep(self._engine_future(self.engine.step, batch), batch, t0, t0_ns, host_free)

    async def _swap_out(self, turn: TurnState, done: TurnDone) -> None:
        model = turn.command.model
        still_here = [rid for rid, h in self.held.items() if h.model == model]
        if not still_here:
            return
        host_free = self.engine.stats().host_kv_bytes_free
        start_ns = time.time_ns()
        with _tracer.start_as_current_span("aegaeon.kv_swap") as span:
            dropped = await self._on_engine(self.engine.swap_out, still_here)
            moved = max(0, host_free - self.engine.stats().host_kv_bytes_free)
            span.set_attributes(
                {"aegaeon.kv_swap.direction": "out", "aegaeon.kv_swap.bytes": moved,
                 "aegaeon.kv_swap.request_ids": still_here, "aegaeon.kv_swap.dropped": len(dropped)}
            )  # fmt: skip
        done.swapped_out = [rid for rid in still_here if rid not in dropped]
        done.recomputed = list(dropped)
        metrics.KV_SWAP_BYTES.labels("out").inc(moved)
        metrics.NUM_PREEMPTIONS.labels(model).inc(len(still_here))
        end_ns = time.time_ns()
        for rid in still_here:
            held = self.held[rid]
            # Dropped KV is recomputed: the request's next step here is a prefill again.
            held.swapped = held.prefilled = rid not in dropped
            self._request_span(turn, "aegaeon.kv_swap", rid, start_ns, end_ns,
                               {"aegaeon.kv_swap.direction": "out" if held.swapped else "drop",
                                "aegaeon.kv_swap.bytes": moved,
                                "aegaeon.kv_swap.requests": len(still_here)})  # fmt: skip

    async def _report_error(self, command: Any, exc: Exception) -> None:
        """A command failed: tell the scheduler; end the affected requests with an error."""
        message = f"{type(exc).__name__}: {exc}"
        request_ids: list[str] = []
        if isinstance(command, AssignRequest):
            request_ids = [command.request_id]
            gateway = {command.request_id: command.gateway_id}
        elif isinstance(command, RunTurn):
            request_ids = [rid for rid in command.request_ids if rid in self.held]
            gateway = {rid: self.held[rid].gateway_id for rid in request_ids}
        else:
            gateway = {}
        events = self.subjects.worker_events(self.worker_id)
        turn_id = command.turn_id if isinstance(command, RunTurn) else None
        await self.bus.publish(events, WorkerError(self.worker_id, message, None, turn_id))
        for rid in request_ids:
            held = self.held.pop(rid, None)
            produced = held.produced if held else 0
            try:
                await self._on_engine(self.engine.abort, rid)
            except Exception:
                log.exception("abort after error failed for %s", rid)
            event = TokenEvent(rid, produced, [], finish_reason="error", error=CLIENT_ERROR)
            await self.bus.publish(self.subjects.tokens(gateway[rid]), TokenBatch([event]))
            await self.bus.publish(
                events, RequestDone(self.worker_id, rid, "error", produced, message)
            )
