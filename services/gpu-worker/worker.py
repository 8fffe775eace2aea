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
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from aegaeon.gpu_worker.delivery import CLIENT_ERROR, HeldRequest, TokenDelivery
from aegaeon.gpu_worker.energy import EnergyMeter, energy_meter
from aegaeon.gpu_worker.progress import report_loading
from nats.errors import NoRespondersError
from opentelemetry import trace
from opentelemetry.context import Context

from aegaeon import metrics
from aegaeon.bus import Bus, context_from
from aegaeon.config import node_name
from aegaeon.fencing_token import EpochFence
from aegaeon.protocol import (
    AbortRequest,
    AssignRequest,
    Drain,
    EnsureCached,
    EvictModel,
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
from aegaeon.state import Keys
from aegaeon.telemetry import RequestTrace, link_to, record_span, tracer

log = logging.getLogger(__name__)

_tracer = tracer(__name__)

HEARTBEAT_INTERVAL_S = 1.0
ENSURE_TIMEOUT_S = 120.0
ENSURE_LEASE_S = 60.0
"""How long the store keeps a model's file for this worker after ensuring it: until the copy
that follows has mapped it (a mapped file survives an eviction)."""


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
        store_id: str | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.store_id = store_id  # this node's model-store; None: any store answers
        self.incarnation = uuid.uuid4().hex
        self.node = node_name()
        self.role = role
        self.engine = engine
        self.bus = bus
        self.redis = redis
        self.keys = Keys(bus.config.prefix)
        self.subjects = bus.subjects
        self.held: dict[str, HeldRequest] = {}
        self.delivery = TokenDelivery(worker_id, bus, redis, self.held)
        self.registered: dict[str, str] = {}  # model → host-cache path registered with the engine
        self.turn: TurnState | None = None
        # A RunTurn received but still queued (behind an assign that loads a model): heartbeats
        # name it, so the scheduler does not take the worker for idle and the turn for lost.
        self._queued_turn: int | None = None
        self.draining = False
        self._commands: asyncio.Queue[Any] = asyncio.Queue()
        self._engine_thread = ThreadPoolExecutor(1, thread_name_prefix="engine")
        self._stopped = asyncio.Event()
        self._prefetch_wanted: str | None = None  # the model the scheduler named last
        self._restaged_for: int | None = None  # a PrefetchModel came after this turn's RunTurn
        self._pinned: str | None = None  # the model the engine keeps in a slot (RunTurn.pinned)
        self._fence = EpochFence()  # the newest scheduler term heard: older ones are ignored
        self._prefetch_tasks: set[asyncio.Task] = set()  # held: a bare task may be collected
        self.energy: EnergyMeter | None = None  # set in run() where the GPU counts energy

    # ------------------------------------------------------------------ plumbing

    async def _on_engine(self, fn: Any, *args: Any) -> Any:
        """Run one engine call on the engine's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._engine_thread, fn, *args)

    async def run(self) -> None:
        """Serve until ``stop()``: heartbeats, the command loop, the subscription."""
        self.energy = energy_meter(str(self.engine.stats().device))
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
        if not self._fence.admits(msg.headers):
            log.warning("dropped %s from an older scheduler term than %d (a deposed leader)",
                        type(command).__name__, self._fence.newest)  # fmt: skip
            return
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
        """Make sure the model is in this node's host cache and registered with the engine."""
        reply = await self._ask_store(EnsureCached(model, lease_s=ENSURE_LEASE_S))
        if reply.model is None or not reply.model.cache_path:
            raise RuntimeError(f"model-store cannot provide {model!r}: {reply.error or 'no cache'}")
        # Not registered yet, its cache file changed, or unloaded by an eviction that overtook
        # this registration (a prefetch's): register it (again).
        if self.registered.get(model) != reply.model.cache_path or model not in self.engine.specs:
            await self._on_engine(
                self.engine.register_model, model, reply.model.path, reply.model.cache_path
            )
            self.registered[model] = reply.model.cache_path

    async def _ask_store(self, request: EnsureCached) -> ModelReply:
        """This node's model-store (its cache paths are in shared memory this worker can map);
        with no store of that id answering, any store (one node, or an id not set alike)."""
        shared = self.subjects.models("ensure")
        if self.store_id:
            local = self.subjects.models(f"ensure.{self.store_id}")
            try:
                return await self.bus.request(local, request, ModelReply, timeout=ENSURE_TIMEOUT_S)
            except NoRespondersError:
                log.warning("no model-store %r answers %s: asking any store", self.store_id, local)
        return await self.bus.request(shared, request, ModelReply, timeout=ENSURE_TIMEOUT_S)

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

    async def _evict(self, model: str) -> None:
        """A drained model is being removed: forget it. Commands run one at a time, so this
        never lands while a turn runs; a later deploy under the same name registers afresh."""
        if self._prefetch_wanted == model:
            self._prefetch_wanted = None
        await self._on_engine(self.engine.unload_model, model)
        self.registered.pop(model, None)
        with contextlib.suppress(KeyError):  # never sampled here: no series to remove
            metrics.RESIDENT_MODELS.remove(self.worker_id, model)
        log.info("evicted %s", model)

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

    async def _switch(self, model: str, request_ids: Sequence[str] = ()) -> Any:
        """Make ``model`` resident; returns the engine's SwitchStats (None when already resident).
        Requests of the turn still waiting for a first token hear how far the loading is."""
        if self.engine.resident_model == model and model in self.registered:
            return None
        waiting = {r: h.gateway_id for r in request_ids if (h := self.held.get(r)) and h.produced == 0}  # fmt: skip
        loaded = self.engine.weights_loaded(model)
        reporting = None
        if waiting and (loaded[0] < loaded[1] or model not in self.registered):
            publish = lambda gateway, batch: self.bus.publish(self.subjects.tokens(gateway), batch)  # noqa: E731
            reporting = asyncio.create_task(
                report_loading(publish, waiting, model, lambda: self.engine.weights_loaded(model))
            )
        try:
            return await self._switch_now(model)
        finally:
            if reporting is not None:
                reporting.cancel()

    async def _switch_now(self, model: str) -> Any:
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
            finished = await self.delivery.deliver(outputs)
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
