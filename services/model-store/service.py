"""The model-store's NATS shell: answers ``models.list|describe|ensure|prefetch|file`` (file
chunks: ``files.py``) and the admin API's verbs ``models.deploy|drain|remove|serving``
(``admin.py``).

Registry scans and cache loads are file I/O, so they run in threads; the event loop only decodes,
dispatches and replies. Workers' heartbeats tell the store how much weight memory the largest
worker has, so a model no worker can hold is refused with a clear error instead of failing later.
Every model it describes carries its lifecycle state and serving settings (``lifecycle.py``'s
book: ``ready``, ``normal`` and unpinned when unmarked) and which store's cache it speaks of.
Every second it tells the scheduler what its host cache holds and on which node
(``models.heartbeat``), for locality-aware placement; other nodes' stores hear it too, and a
miss here copies a peer's cached file when one holds the model (``peers.py``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
from nats.aio.msg import Msg
from opentelemetry import trace

from aegaeon import metrics
from aegaeon.bus import Bus, context_from
from aegaeon.capacity import largest_slot
from aegaeon.config import node_name
from aegaeon.protocol import (
    DeployModel,
    DescribeModel,
    DrainModel,
    EnsureCached,
    EvictIdle,
    FetchFile,
    FileChunk,
    Heartbeat,
    ListModels,
    ModelChanged,
    ModelInfo,
    ModelList,
    ModelReply,
    PrefetchHint,
    RemoveModel,
    SetServing,
    ShareCached,
    StoreHeartbeat,
    decode,
    encode,
)
from aegaeon.telemetry import tracer

from .admin import LifecycleVerbs
from .files import read_chunk
from .host_cache import CacheError, HostCache
from .lifecycle import LifecycleBook
from .peers import Peers
from .registry import Registry, RegistryScanner

log = logging.getLogger(__name__)
_tracer = tracer(__name__)

HEARTBEAT_FRESH_S = 30.0
STORE_HEARTBEAT_INTERVAL_S = 1.0
"""How often the store says what its cache holds (the scheduler forgets it after 3 silent)."""
RESCAN_INTERVAL_S = 1.0
QUEUE = "model-store"


class ModelStoreService:
    """Registry + host cache behind NATS. ``await start()``, later ``await stop()``."""

    def __init__(
        self, bus: Bus, scanner: RegistryScanner, cache: HostCache, store_id: str | None = None,
        node: str | None = None, transfer_address: str = "",
    ) -> None:  # fmt: skip
        self.bus = bus
        self.store_id = store_id
        self.node = node or node_name()  # the workers' Heartbeat.node on this store's host
        self.scanner = scanner
        self.cache = cache
        self._registry = Registry()
        self._scanned_at = float("-inf")
        self._scan_lock = asyncio.Lock()
        self._budgets: dict[str, tuple[Heartbeat, float]] = {}  # worker id → (last beat, seen at)
        self._prefetches: set[asyncio.Task] = set()
        self._evictions: set[asyncio.Task] = set()  # idle models waiting for their lease to end
        self._subscriptions: list[Any] = []
        self._beating: asyncio.Task | None = None
        self.book = LifecycleBook(scanner.models_dir)
        self.lifecycle = LifecycleVerbs(self, self.book)
        # Serving this cache's files to other nodes needs an id they can address.
        self.peers = Peers(bus, cache, store_id or self.node, transfer_address if store_id else "")

    async def start(self) -> None:
        """Subscribe to every verb; a queue group lets several stores share the load."""
        handlers: dict[str, tuple[Any, Callable[[Any], Awaitable[Any]]]] = {
            "list": (ListModels, self.on_list),
            "describe": (DescribeModel, self.on_describe),
            "ensure": (EnsureCached, self.on_ensure),
            "prefetch": (PrefetchHint, self.on_prefetch),
            "file": (FetchFile, self.on_file),
            "deploy": (DeployModel, self.lifecycle.on_deploy),
            "drain": (DrainModel, self.lifecycle.on_drain),
            "remove": (RemoveModel, self.lifecycle.on_remove),
            "serving": (SetServing, self.lifecycle.on_set_serving),
        }
        for verb, (message_type, handler) in handlers.items():
            subject = self.bus.subjects.models(verb)
            callback = self._responder(message_type, handler)
            self._subscriptions.append(await self.bus.nc.subscribe(subject, QUEUE, cb=callback))
        if self.store_id:
            # A node-local subject: with a store per node, a worker must get *its* node's cache
            # path, which the shared queue group cannot promise.
            local = self.bus.subjects.models(f"ensure.{self.store_id}")
            callback = self._responder(EnsureCached, self.on_ensure)
            self._subscriptions.append(await self.bus.nc.subscribe(local, cb=callback))
        await self.peers.start()
        if self.peers.server is not None:
            share = self.bus.subjects.models(f"share.{self.store_id}")
            callback = self._responder(ShareCached, self.peers.on_share)
            self._subscriptions.append(await self.bus.nc.subscribe(share, cb=callback))
        self._subscriptions.append(
            await self.bus.subscribe(
                self.bus.subjects.store_heartbeat, StoreHeartbeat, self.on_store_heartbeat
            )
        )
        self._subscriptions.append(
            await self.bus.subscribe(self.bus.subjects.heartbeat, Heartbeat, self.on_heartbeat)
        )
        # Every store (no queue group): each node's cache holds its own copy.
        self._subscriptions.append(
            await self.bus.subscribe(self.bus.subjects.models("evict"), EvictIdle, self.on_evict)
        )
        self._subscriptions.append(
            await self.bus.subscribe(
                self.bus.subjects.registry_changed, ModelChanged, self.on_registry_changed
            )
        )
        await self.bus.nc.flush()  # the server knows every subscription before start() returns
        await self.refresh(force=True)
        self.lifecycle.resume_loads()
        self._beating = asyncio.create_task(self._beat())

    async def stop(self) -> None:
        """Stop answering and wait for prefetches in flight (their files are finished, not cut)."""
        stopped = [self._beating] if self._beating is not None else []
        self._beating = None
        for subscription in self._subscriptions:
            await subscription.unsubscribe()
        self._subscriptions.clear()
        await self.peers.stop()
        stopped += self._evictions
        for task in stopped:
            task.cancel()
        await asyncio.gather(*stopped, return_exceptions=True)
        if self._prefetches or self.lifecycle.loads:
            await asyncio.gather(*self._prefetches, *self.lifecycle.loads, return_exceptions=True)

    def _responder(self, message_type: Any, handler: Callable[[Any], Awaitable[Any]]):
        """Decode, run ``handler``, reply. Bad input gets an error reply, never silence."""

        async def on_message(msg: Msg) -> None:
            # A child of the asker's span: a worker's switch shows the cache load it waited for.
            name = f"model-store.{msg.subject.rsplit('.', 1)[-1]}"
            with _tracer.start_as_current_span(name, context=context_from(msg)):
                reply = await answer(msg)
            if msg.reply and reply is not None:
                await msg.respond(encode(reply))

        async def answer(msg: Msg) -> Any:
            try:
                request = decode(msg.data, message_type)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                return ModelReply(error=f"malformed {message_type.__name__}: {exc}", status=400)
            try:
                return await handler(request)
            except Exception as exc:  # a bug must not take the store down
                log.exception("models handler failed on %s", msg.subject)
                return ModelReply(error=f"model-store error: {exc}", status=500)

        return on_message

    # ------------------------------------------------------------------ heartbeat

    def heartbeat(self) -> StoreHeartbeat:
        """What this store's host cache holds now."""
        cached, used = self.cache.contents()
        return StoreHeartbeat(
            store_id=self.store_id or self.node,
            node=self.node,
            time=time.time(),
            cached=cached,
            cache_bytes_free=max(0, self.cache.capacity_bytes - used),
            cache_bytes_total=self.cache.capacity_bytes,
            interval_s=STORE_HEARTBEAT_INTERVAL_S,
            transfer_endpoint=self.peers.endpoint,
            peer_loads=self.cache.peer_copies,
            peer_bytes=self.cache.peer_bytes,
        )

    async def _beat(self) -> None:
        """Publish :meth:`heartbeat` every interval until stopped; one failure is logged."""
        while True:
            try:
                await self.bus.publish(self.bus.subjects.store_heartbeat, self.heartbeat())
            except Exception:
                log.exception("store heartbeat failed")
            await asyncio.sleep(STORE_HEARTBEAT_INTERVAL_S)

    # ------------------------------------------------------------------ registry

    async def refresh(self, force: bool = False) -> Registry:
        """The registry, re-scanned at most once a second (or now, with ``force``)."""
        async with self._scan_lock:
            if force or time.monotonic() - self._scanned_at >= RESCAN_INTERVAL_S:
                self.book.reload_if_changed()  # another store sharing the directory moved one
                self._registry = await asyncio.to_thread(self.scanner.scan)
                self._scanned_at = time.monotonic()
                metrics.REGISTERED_MODELS.set(len(self._registry.models))
            return self._registry

    async def lookup(self, name: str) -> ModelInfo | None:
        """A registered model; an unknown name forces a re-scan (it may have just been added)."""
        info = (await self.refresh()).models.get(name)
        if info is None:
            info = (await self.refresh(force=True)).models.get(name)
        return info

    def current(self, info: ModelInfo) -> ModelInfo:
        """``info`` with its lifecycle state, its serving settings and what this store's host
        cache holds of it."""
        path = self.cache.cached_path(info.name)
        return msgspec.structs.replace(
            info,
            cached=path is not None,
            cache_path=str(path) if path else None,
            cache_store=self.store_id,
            state=self.book.state(info.name, registered=True) or "ready",
            state_reason=self.book.reason(info.name),
            priority=self.book.priority(info.name),
            pin=self.book.pin(info.name),
            keep_alive_s=self.book.keep_alive_s(info.name),
        )

    async def unservable(self, name: str) -> ModelInfo | None:
        """``name`` as a ``failed`` model when its entry cannot be served (a link whose target is
        gone, a folder the scan refused: a broken config.json, unreadable safetensors), with
        why, else None: the admin API removes it as it removes any failed model. Call after
        :meth:`lookup` found no model (the registry is then fresh)."""
        registry = await self.refresh()
        why = registry.problems.get(name)
        if why is None:
            return None
        path = registry.broken_links.get(name, self.scanner.models_dir / name)
        return ModelInfo(name=name, architecture="", model_type="", path=str(path),
                         weight_bytes=0, num_parameters=0, context_length=0, dtype="",
                         state="failed", state_reason=why, cache_store=self.store_id)  # fmt: skip

    async def unknown(self, name: str) -> ModelReply:
        registry = await self.refresh()
        why = registry.problems.get(name)
        if why:
            return ModelReply(error=f"model {name!r} is registered but cannot be served: {why}")
        return ModelReply(error=f"model {name!r} is not registered")

    # ------------------------------------------------------------------ verbs

    async def on_list(self, _request: ListModels) -> ModelList:
        registry = await self.refresh()
        return ModelList([self.current(m) for m in registry.models.values()])

    async def on_describe(self, request: DescribeModel) -> ModelReply:
        info = await self.lookup(request.name)
        if info is None:
            failed = await self.unservable(request.name)  # the admin API may remove it
            if failed is None:
                return await self.unknown(request.name)
            return ModelReply(model=failed)
        return ModelReply(model=self.current(info))

    async def on_ensure(self, request: EnsureCached) -> ModelReply:
        info = await self.lookup(request.name)
        if info is None:
            return await self.unknown(request.name)
        too_large = self.check_fits_workers(info)
        if too_large:
            return ModelReply(error=too_large)
        result = "hit" if self.cache.cached_path(info.name) is not None else "miss"
        start = time.monotonic()
        try:
            peer = None
            if result == "miss":  # another node's cache may hold it: a copy beats the disk
                peer = await self.peers.ask(info, await asyncio.to_thread(self.cache.signature, info))  # fmt: skip
            path = await asyncio.to_thread(self.cache.ensure, info, request.lease_s, peer)
        except CacheError as exc:
            return ModelReply(error=str(exc))
        elapsed = time.monotonic() - start
        metrics.HOST_CACHE_ENSURE.labels(info.name, result).observe(elapsed)
        trace.get_current_span().set_attributes(
            {"aegaeon.model": info.name, "aegaeon.host_cache.result": result}
        )
        return ModelReply(model=msgspec.structs.replace(info, cached=True, cache_path=str(path)))

    async def on_evict(self, request: EvictIdle, _msg: Any) -> None:
        """A model idle past its keep-alive (the scheduler's word): out of this node's cache,
        in a task of its own (it may wait for a lease)."""
        task = asyncio.create_task(self._evict_idle(request.name), name=f"evict {request.name}")
        self._evictions.add(task)
        task.add_done_callback(self._evictions.discard)

    async def _evict_idle(self, name: str) -> None:
        """Drop ``name`` once no worker's lease holds it (a lease covers an ensure's answer until
        the worker has mapped the file), unless an ensure asks for it meanwhile: then it is in
        use again, and its next idle spell ends it."""
        used = self.cache.last_used(name)
        while used is not None:
            held = await asyncio.to_thread(self.cache.evict_unless_leased, name)
            if held is None:
                log.info("%s idle past its keep-alive: dropped from the host cache", name)
                return
            await asyncio.sleep(held)
            if self.cache.last_used(name) != used:
                return

    async def on_prefetch(self, request: PrefetchHint) -> ModelReply | None:
        """Warm the cache in the background; the hint needs no answer (one is sent if asked)."""
        task = asyncio.create_task(self._prefetch(request.name))
        self._prefetches.add(task)
        task.add_done_callback(self._prefetches.discard)
        return ModelReply()

    async def _prefetch(self, name: str) -> None:
        reply = await self.on_ensure(EnsureCached(name))
        if reply.error:
            log.warning("prefetch of %s failed: %s", name, reply.error)

    async def on_file(self, request: FetchFile) -> FileChunk:
        info = await self.lookup(request.name)
        if info is None:
            return FileChunk(error=(await self.unknown(request.name)).error)
        return await asyncio.to_thread(read_chunk, Path(info.path), request)

    async def on_store_heartbeat(self, beat: StoreHeartbeat, _msg: Msg) -> None:
        self.peers.heard(beat)

    async def on_heartbeat(self, beat: Heartbeat, _msg: Msg) -> None:
        if beat.weight_budget_bytes > 0:
            self._budgets[beat.worker_id] = (beat, time.monotonic())

    async def on_registry_changed(self, change: ModelChanged, _msg: Msg) -> None:
        """A store (this one too) moved a model: see it now; a removed one leaves this cache."""
        if change.removed:
            self.cache.evict(change.model.name)
        await self.refresh(force=True)

    def _fresh_beats(self) -> list[Heartbeat]:
        now = time.monotonic()
        for worker_id in [w for w, (_, seen) in self._budgets.items() if now - seen >= HEARTBEAT_FRESH_S]:  # fmt: skip
            del self._budgets[worker_id]  # gone (a restarted worker may come back under a new id)
        return [beat for beat, _ in self._budgets.values()]

    def largest_slot(self) -> int | None:
        """The largest weight slot among live workers (None: none has reported)."""
        return max((largest_slot(beat) for beat in self._fresh_beats()), default=None)

    def check_fits_workers(self, info: ModelInfo) -> str:
        """An error message when no live worker can hold the model's weights, else ''."""
        budgets = [beat.weight_budget_bytes for beat in self._fresh_beats()]
        if not budgets or info.weight_bytes <= max(budgets):
            return ""  # no worker has reported yet: let the worker decide
        return (
            f"model {info.name} has {info.weight_bytes} bytes of weights; the largest worker "
            f"weight budget is {max(budgets)} bytes, so no worker can load it"
        )
