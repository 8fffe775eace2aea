"""Which model the worker's engine holds (mixed into ``WorkerService``): the node's host cache
asked for a model's file, the engine's registration of it, foreground switches (with loading
progress to requests waiting for a first token) and background prefetch into the free slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

from aegaeon.gpu_worker.progress import report_loading
from aegaeon.gpu_worker.worker_core import ENSURE_LEASE_S, ENSURE_TIMEOUT_S, WorkerCore
from nats.errors import NoRespondersError

from aegaeon import metrics
from aegaeon.protocol import EnsureCached, ModelReply, SwitchDone
from aegaeon.telemetry import tracer

log = logging.getLogger(__name__)

_tracer = tracer(__name__)

MAPPING_SWEEP_S = 5.0
"""How often the engine's host mappings are checked against the host cache's files."""


class Residency(WorkerCore):
    """Host-cache loads, switches and prefetch of the worker's engine."""

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
        with no store of that id answering, any store (one node, or an id not set alike). Asked
        again after a reconnect (an ensure may be answered twice): an answer lost with a
        crashed NATS server must not hold the turn for the whole timeout."""
        ask = self.bus.request_idempotent
        shared = self.subjects.models("ensure")
        if self.store_id:
            local = self.subjects.models(f"ensure.{self.store_id}")
            try:
                return await ask(local, request, ModelReply, timeout=ENSURE_TIMEOUT_S)
            except NoRespondersError:
                log.warning("no model-store %r answers %s: asking any store", self.store_id, local)
        return await ask(shared, request, ModelReply, timeout=ENSURE_TIMEOUT_S)

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

    async def _release_stale_mappings_loop(self) -> None:
        """Every few seconds, unmap host-cache files the model-store has evicted: a mapping
        keeps an unlinked file's pages, which the store believes it freed."""
        while True:
            await asyncio.sleep(MAPPING_SWEEP_S)
            released = await self._on_engine(self.engine.release_stale_host_mappings)
            if released:
                log.info("unmapped evicted host-cache files of %s", ", ".join(released))

    def _start_prefetch(self, model: str) -> None:
        """Stage ``model`` in the engine's free weight slot in the background: the host-cache
        round trip runs in a task (a turn's first step must not wait for it) and the copy then
        overlaps the steps. Only the most recent wish is acted on."""
        self._prefetch_wanted = model
        asked = self._switches, self._turn_in_hand()
        task = asyncio.create_task(self._prefetch_when_cached(model, *asked), name=f"prefetch {model}")  # fmt: skip
        self._prefetch_tasks.add(task)
        task.add_done_callback(self._prefetch_tasks.discard)

    async def _prefetch_when_cached(self, model: str, switches: int, turn: int | None) -> None:
        try:
            await self._ensure_model(model)
            if self._prefetch_wanted != model:
                return
            if not await self._on_engine(self._prefetch_on_engine, model, switches, turn):
                log.debug("prefetch of %s dropped: a switch since it was asked took its slot", model)  # fmt: skip
                if self._prefetch_wanted == model:
                    self._prefetch_wanted = None
        except Exception as exc:  # a hint: the switch copies in the foreground instead
            log.warning("prefetch of %s not started: %s", model, exc)

    def _prefetch_on_engine(self, model: str, switches: int, turn: int | None) -> bool:
        """On the engine thread: start the copy unless a switch made after the wish (other than
        the switch of ``turn``, the turn in hand when it was made) moved the slots. The
        scheduler named the model for the free slot as it was; a later switch copied its model
        there and left the one before it in the other slot, which the scheduler's books now
        count on (``switch_slots``); copying the stale wish over it would leave the books wrong."""
        since = self._switches - switches
        if since > 1 or (since == 1 and (turn is None or turn != self._last_switch_turn)):
            return False
        before = self.engine.slots.prefetching
        self.engine.start_prefetch(model)
        if before != model and self.engine.slots.prefetching == model:
            self._staged_while_idle = (model, self._turn_in_hand() is None)
        return True

    def _switch_on_engine(self, model: str, turn: int | None) -> Any:
        """On the engine thread: switch, and count it for :meth:`_prefetch_on_engine`. Returns
        the engine's stats and whether the background copy it found was staged while idle."""
        stats = self.engine.switch_to(model)
        if stats.from_model != stats.to_model:
            self._switches += 1
            self._last_switch_turn = turn
        staged, self._staged_while_idle = self._staged_while_idle, None
        if staged is not None and staged[0] != model and self.engine.slots.prefetching == staged[0]:
            self._staged_while_idle = staged  # the switch left that staging where it was
        return stats, staged == (model, True) and stats.prefetched_bytes > 0

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
            stats, idle_staged = await self._on_engine(
                self._switch_on_engine, model, self._turn_in_hand()
            )
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
                           stats.prefetched_bytes, staged_while_idle=idle_staged),
            )  # fmt: skip
        return stats
