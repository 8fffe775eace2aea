"""The gpu-worker's NATS shell: commands in, engine steps, tokens and events out.

The engine is synchronous torch code and is only ever touched from one thread (``_engine_thread``).
An asyncio coroutine drives a turn one step at a time, so commands (abort, preempt) that arrive
mid-turn land between two steps — at a token boundary — without a message per token::

    RunTurn ──► ensure weights cached ──► switch_to(model) ──► step ─┬─► publish TokenBatch per gateway
                                                                     ├─► append tokens to Redis (recovery)
                                        quota / empty / preempt ◄────┘
                                        ──► swap_out (if asked) ──► TurnDone
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from opentelemetry import trace
from opentelemetry.context import Context

from aegaeon import metrics
from aegaeon.bus import Bus, context_from
from aegaeon.config import node_name
from aegaeon.protocol import (
    AbortRequest,
    AssignRequest,
    Drain,
    EnsureCached,
    Heartbeat,
    KVImported,
    ModelReply,
    Preempt,
    PrefetchModel,
    RequestDone,
    RunTurn,
    SwitchDone,
    TokenBatch,
    TokenEvent,
    TurnDone,
    WorkerCommand,
    WorkerError,
    WorkerRole,
)
from aegaeon.state import REQUEST_TTL_S, Keys
from aegaeon.telemetry import RequestTrace, link_to, record_span, tracer

log = logging.getLogger(__name__)

CLIENT_ERROR = "the server failed while generating this request; it was stopped"
"""What a client is told when the engine fails its request: the cause (exception text, which can
name internals) goes to the worker's log and to the scheduler's RequestDone, not to the client."""
_tracer = tracer(__name__)

HEARTBEAT_INTERVAL_S = 1.0
ENSURE_TIMEOUT_S = 120.0


@dataclass
class HeldRequest:
    """What the shell remembers of a request the engine holds: where its tokens go."""

    request_id: str
    model: str
    gateway_id: str
    produced: int  # tokens of the output so far (incl. any sent before a recovery)
    trace: RequestTrace | None = None  # its gateway's trace: the request's spans go there
    prefilled: bool = False  # its KV exists here (on the device or in the host pool)
    swapped: bool = False  # its KV is in the host pool: the next step brings it back


@dataclass
class TurnState:
    """The turn in progress."""

    command: RunTurn
    preempted: bool = False
    started: float = field(default_factory=time.monotonic)
    span: trace.Span = trace.INVALID_SPAN  # ``aegaeon.turn``
    first_step_ns: int = 0  # wall clock of the first step (after the switch), for spans
    last_step_ns: int = 0
    tokens: dict[str, int] = field(default_factory=dict)  # request id → tokens this turn
    traces: dict[str, RequestTrace] = field(default_factory=dict)  # outlive a finished request
    prefilled: list[str] = field(default_factory=list)  # requests whose prefill ran this turn


class WorkerService:
    """One worker: an Engine behind NATS. Build with ``WorkerService(...)``, then ``await run()``."""

    def __init__(
        self,
        worker_id: str,
        role: WorkerRole,
        engine: Any,
        bus: Bus,
        redis: aioredis.Redis,
    ) -> None:
        self.worker_id = worker_id
        self.incarnation = uuid.uuid4().hex
        self.node = node_name()
        self.role = role
        self.engine = engine
        self.bus = bus
        self.redis = redis
        self.keys = Keys(bus.config.prefix)
        self.subjects = bus.subjects
        self.held: dict[str, HeldRequest] = {}
        self.registered: dict[str, str] = {}  # model → host-cache path registered with the engine
        self.turn: TurnState | None = None
        # A RunTurn received but still queued (behind an assign that loads a model): heartbeats
        # name it, so the scheduler does not take the worker for idle and the turn for lost.
        self._queued_turn: int | None = None
        self.draining = False
        self._commands: asyncio.Queue[Any] = asyncio.Queue()
        self._engine_thread = ThreadPoolExecutor(1, thread_name_prefix="engine")
        self._stopped = asyncio.Event()
        self._redis_writes: asyncio.Task | None = None
        self._prefetch_wanted: str | None = None  # the model the scheduler named last
        self._restaged_for: int | None = None  # a PrefetchModel came after this turn's RunTurn
        self._prefetch_tasks: set[asyncio.Task] = set()  # held: a bare task may be collected

    # ------------------------------------------------------------------ plumbing

    async def _on_engine(self, fn: Any, *args: Any) -> Any:
        """Run one engine call on the engine's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._engine_thread, fn, *args)

    async def run(self) -> None:
        """Serve until ``stop()``: heartbeats, the command loop, the subscription."""
        sub = await self.bus.subscribe(
            self.subjects.worker_cmd(self.worker_id), WorkerCommand, self._on_command
        )
        tasks = [
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
            asyncio.create_task(self._command_loop(), name="commands"),
        ]
        log.info("worker %s ready (%s)", self.worker_id, self.engine.stats())
        await self._stopped.wait()
        await sub.unsubscribe()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._publish_heartbeat(draining=True)
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
        # Preempt and PrefetchModel must not wait behind a running turn: one raises a flag, the
        # other starts a background copy that is meant to overlap that turn.
        if isinstance(command, PrefetchModel):
            # Newer than the choice of the turn running or queued (one at a time per worker).
            self._restaged_for = self.turn.command.turn_id if self.turn else self._queued_turn
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

    async def _ensure_model(self, model: str) -> None:
        """Make sure the model is in the host cache and registered with the engine."""
        reply = await self.bus.request(
            self.subjects.models("ensure"),
            EnsureCached(model),
            ModelReply,
            timeout=ENSURE_TIMEOUT_S,
        )
        if reply.model is None or not reply.model.cache_path:
            raise RuntimeError(f"model-store cannot provide {model!r}: {reply.error or 'no cache'}")
        if self.registered.get(model) != reply.model.cache_path:
            await self._on_engine(
                self.engine.register_model, model, reply.model.path, reply.model.cache_path
            )
            self.registered[model] = reply.model.cache_path

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

    async def _import_kv(
        self, command: AssignRequest, args: tuple[Any, ...], traced: RequestTrace | None
    ) -> bool:
        """Prefill → decode hand-off: copy the KV another worker on this node exported into
        this engine's host pool. Reports KVImported either way (the source may then free its
        copy); False: the request is re-prefilled here from prompt + tokens instead."""
        assert command.kv is not None
        rid, source = command.request_id, command.kv_source or ""
        start, start_ns = time.monotonic(), time.time_ns()
        try:
            await self._on_engine(self.engine.import_kv, *args, command.kv)
        except Exception as exc:  # the source died, its pool is full or gone: re-prefill
            log.warning("KV of %s from %s not imported: %s", rid, source, exc)
            if rid in self.engine.request_ids():
                await self._on_engine(self.engine.abort, rid)
            event = KVImported(self.worker_id, rid, source, ok=False,
                               message=f"{type(exc).__name__}: {exc}")  # fmt: skip
        else:
            seconds = time.monotonic() - start
            metrics.KV_HANDOFF.labels(command.model).observe(seconds)
            event = KVImported(self.worker_id, rid, source, ok=True, seconds=seconds,
                               bytes=command.kv.nbytes)  # fmt: skip
            if traced is not None:
                record_span("aegaeon.kv_handoff", traced.context, start_ns, time.time_ns(),
                            {"aegaeon.request_id": rid, "aegaeon.kv_handoff.source": source,
                             "aegaeon.kv_handoff.bytes": command.kv.nbytes})  # fmt: skip
        await self.bus.publish(self.subjects.worker_events(self.worker_id), event)
        return event.ok

    async def _abort(self, command: AbortRequest) -> None:
        held = self.held.pop(command.request_id, None)
        if held is None:
            return
        await self._on_engine(self.engine.abort, command.request_id)
        await self.bus.publish(
            self.subjects.worker_events(self.worker_id),
            RequestDone(self.worker_id, command.request_id, "abort", held.produced),
        )

    def _start_prefetch(self, model: str) -> None:
        """Stage ``model`` in the engine's free weight slot in the background: the host-cache
        round trip runs in a task (a turn's first step must not wait for it) and the copy then
        overlaps the steps. Only the most recent wish is acted on."""
        self._prefetch_wanted = model
        task = asyncio.create_task(self._prefetch_when_cached(model), name=f"prefetch {model}")
        self._prefetch_tasks.add(task)
        task.add_done_callback(self._prefetch_tasks.discard)

    async def _prefetch_when_cached(self, model: str) -> None:
        try:
            await self._ensure_model(model)
            if self._prefetch_wanted == model:
                await self._on_engine(self.engine.start_prefetch, model)
        except Exception as exc:  # a hint: the switch copies in the foreground instead
            log.warning("prefetch of %s not started: %s", model, exc)

    async def _switch(self, model: str) -> Any:
        """Make ``model`` resident; returns the engine's SwitchStats (None when already resident)."""
        if self.engine.resident_model == model and model in self.registered:
            return None
        await self._ensure_model(model)
        with _tracer.start_as_current_span("aegaeon.switch") as span:
            stats = await self._on_engine(self.engine.switch_to, model)
            span.set_attributes(
                {
                    "aegaeon.switch.from": stats.from_model or "",
                    "aegaeon.switch.to": model,
                    "aegaeon.switch.bytes": int(stats.bytes),
                    "aegaeon.switch.prefetched_bytes": int(stats.prefetched_bytes),
                    "aegaeon.switch.ms": stats.seconds * 1000.0,
                }
            )
        if stats.from_model != stats.to_model:
            metrics.MODEL_SWITCHES.labels(model).inc()
            metrics.MODEL_SWITCH_LATENCY.labels(model).observe(stats.seconds)
            metrics.MODEL_SWITCH_BYTES.labels(model, "waited").inc(stats.bytes)
            metrics.MODEL_SWITCH_BYTES.labels(model, "prefetched").inc(stats.prefetched_bytes)
            await self.bus.publish(
                self.subjects.worker_events(self.worker_id),
                SwitchDone(self.worker_id, stats.from_model, model, stats.seconds, stats.bytes,
                           stats.prefetched_bytes),
            )  # fmt: skip
        return stats

    async def _run_turn(self, command: RunTurn, context: Context | None = None) -> None:
        turn = self.turn = TurnState(command)
        if self._queued_turn == command.turn_id:
            self._queued_turn = None
        done = TurnDone(self.worker_id, command.turn_id, command.model, steps=0, elapsed_s=0.0)
        with _tracer.start_as_current_span(
            "aegaeon.turn", context=context, links=self._turn_links(command, context),
            attributes={"aegaeon.turn_id": command.turn_id, "aegaeon.worker_id": self.worker_id,
                        "aegaeon.model": command.model, "aegaeon.quota_s": command.quota_s},
        ) as turn.span:  # fmt: skip
            try:
                for rid in command.drop_kv:  # before the switch, as an unloading instance would
                    await self._drop_kv(rid)
                switch = await self._switch(command.model)
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
                self._end_turn_spans(turn, done)
                await self._flush_redis()
                await self.bus.publish(self.subjects.worker_events(self.worker_id), done)

    async def _drop_kv(self, request_id: str) -> None:
        held = self.held.get(request_id)
        if held is None:
            return
        await self._on_engine(self.engine.drop_kv, request_id)
        held.prefilled = held.swapped = False  # its next step here is a prefill again

    async def _export_kv(self, command: RunTurn, done: TurnDone) -> None:
        """Leave the KV of the requests handed to a decode worker on this node in the host pool;
        they stay held (the pool keeps their bytes) until the scheduler's AbortRequest."""
        for rid in command.export_kv:
            if rid not in self.held:
                continue  # finished in this turn
            try:
                done.exported[rid] = await self._on_engine(self.engine.export_kv, rid)
            except Exception as exc:  # fallback-runner model, full pool: the target re-prefills
                log.info("KV of %s not exported: %s", rid, exc)
                continue
            self.held[rid].swapped = True

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

    async def _step_until_turn_ends(self, turn: TurnState, done: TurnDone) -> None:
        command = turn.command
        batch = [rid for rid in command.request_ids if rid in self.held]
        done.batch_size = len(batch)
        first_step_at: float | None = None
        while batch and not turn.preempted:
            if command.max_steps is not None and done.steps >= command.max_steps:
                break
            if first_step_at and time.monotonic() - first_step_at >= command.quota_s:
                break
            t0, t0_ns = time.monotonic(), time.time_ns()
            host_free = self.engine.stats().host_kv_bytes_free
            outputs = await self._on_engine(self.engine.step, batch)
            elapsed = time.monotonic() - t0
            self._observe_step(turn, batch, outputs, t0_ns, elapsed, host_free)
            done.steps += 1
            finished = await self._deliver(outputs)
            # What the step cost the turn, its tokens' delivery included (the estimators learn
            # the pace of tokens from it, not the engine's time alone).
            spent = time.monotonic() - t0
            if first_step_at is None:
                first_step_at = t0  # the quota runs from the first step, after the switch
                done.prefill_s += spent
            else:
                done.decode_s += spent
            done.finished.extend(finished)
            batch = [rid for rid in batch if rid in self.held]
            if command.prefill_only:
                break

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

    # ------------------------------------------------------------------ output

    async def _deliver(self, outputs: Sequence[Any]) -> list[str]:
        """Publish one step's tokens to each owning gateway; returns the finished request ids."""
        per_gateway: dict[str, list[TokenEvent]] = defaultdict(list)
        finished: list[str] = []
        redis_tokens: dict[str, list[int]] = defaultdict(list)
        failed: dict[str, str] = {}
        for out in outputs:
            held = self.held.get(out.request_id)
            if held is None:
                continue
            if out.error is not None:  # this request alone failed in the engine: end it
                failed[out.request_id] = out.error
                per_gateway[held.gateway_id].append(
                    TokenEvent(out.request_id, out.index, [], finish_reason="error",
                               error=CLIENT_ERROR)
                )  # fmt: skip
                finished.append(out.request_id)
                continue
            logprobs = (
                [(float(out.logprob), [(int(t), float(p)) for t, p in out.top_logprobs])]
                if out.logprob is not None and out.top_logprobs is not None and out.top_logprobs
                else ([(float(out.logprob), [])] if out.logprob is not None else [])
            )
            per_gateway[held.gateway_id].append(
                TokenEvent(
                    out.request_id,
                    out.index,
                    [int(out.token_id)],
                    logprobs,
                    finish_reason=out.finish_reason,
                )
            )
            held.produced = out.index + 1
            redis_tokens[out.request_id].append(int(out.token_id))
            if out.finish_reason is not None:
                finished.append(out.request_id)
        for gateway_id, events in per_gateway.items():
            batch = TokenBatch(events, sent_at=time.time())
            await self.bus.publish(self.subjects.tokens(gateway_id), batch)
        await self._append_tokens(redis_tokens)
        for rid in finished:
            held = self.held.pop(rid)
            await self.bus.publish(
                self.subjects.worker_events(self.worker_id),
                RequestDone(self.worker_id, rid, _reason(outputs, rid), held.produced,
                            failed.get(rid, "")),
            )  # fmt: skip
        return finished

    async def _append_tokens(self, tokens: dict[str, list[int]]) -> None:
        """Record sent tokens in Redis for recovery, overlapped with the next engine step but kept
        in order (each write waits for the previous one)."""
        if not tokens:
            return
        previous = self._redis_writes

        async def write() -> None:
            if previous is not None:
                await asyncio.gather(previous, return_exceptions=True)
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for rid, ids in tokens.items():
                        key = self.keys.output_tokens(rid)
                        pipe.rpush(key, *ids)
                        pipe.expire(key, REQUEST_TTL_S)
                    await pipe.execute()
            except Exception as exc:  # Redis restarting: recovery then re-runs from less
                log.warning("could not record tokens in Redis: %s", exc)

        self._redis_writes = asyncio.create_task(write())

    async def _flush_redis(self) -> None:
        if self._redis_writes is not None:
            await asyncio.gather(self._redis_writes, return_exceptions=True)
            self._redis_writes = None

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


def _reason(outputs: Sequence[Any], request_id: str) -> Any:
    for out in outputs:
        if out.request_id == request_id and out.finish_reason is not None:
            return out.finish_reason
    return "stop"
