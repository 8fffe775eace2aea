"""The model-store's NATS shell: answers ``models.list|describe|ensure|prefetch|file``.

Registry scans and cache loads are file I/O, so they run in threads; the event loop only decodes,
dispatches and replies. Workers' heartbeats tell the store how much weight memory the largest
worker has, so a model no worker can hold is refused with a clear error instead of failing later.
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
from aegaeon.protocol import (
    DescribeModel,
    EnsureCached,
    FetchFile,
    FileChunk,
    Heartbeat,
    ListModels,
    ModelInfo,
    ModelList,
    ModelReply,
    PrefetchHint,
    decode,
    encode,
)
from aegaeon.telemetry import tracer

from .host_cache import CacheError, HostCache
from .registry import Registry, RegistryScanner

log = logging.getLogger(__name__)
_tracer = tracer(__name__)

MAX_CHUNK = 512 * 1024
"""Largest FetchFile chunk: well under NATS's 1 MiB payload limit."""
MAX_SERVED_FILE = 64 * 1024 * 1024
"""FetchFile serves small files (tokenizer, config); weights move through shared memory."""
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")
HEARTBEAT_FRESH_S = 30.0
RESCAN_INTERVAL_S = 1.0
QUEUE = "model-store"


class ModelStoreService:
    """Registry + host cache behind NATS. ``await start()``, later ``await stop()``."""

    def __init__(
        self, bus: Bus, scanner: RegistryScanner, cache: HostCache, store_id: str | None = None
    ) -> None:
        self.bus = bus
        self.store_id = store_id
        self.scanner = scanner
        self.cache = cache
        self._registry = Registry()
        self._scanned_at = float("-inf")
        self._scan_lock = asyncio.Lock()
        self._budgets: dict[str, tuple[int, float]] = {}  # worker id → (weight budget, seen at)
        self._prefetches: set[asyncio.Task] = set()
        self._subscriptions: list[Any] = []

    async def start(self) -> None:
        """Subscribe to every verb; a queue group lets several stores share the load."""
        handlers: dict[str, tuple[Any, Callable[[Any], Awaitable[Any]]]] = {
            "list": (ListModels, self.on_list),
            "describe": (DescribeModel, self.on_describe),
            "ensure": (EnsureCached, self.on_ensure),
            "prefetch": (PrefetchHint, self.on_prefetch),
            "file": (FetchFile, self.on_file),
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
        self._subscriptions.append(
            await self.bus.subscribe(self.bus.subjects.heartbeat, Heartbeat, self.on_heartbeat)
        )
        await self.bus.nc.flush()  # the server knows every subscription before start() returns
        await self.refresh(force=True)

    async def stop(self) -> None:
        """Stop answering and wait for prefetches in flight (their files are finished, not cut)."""
        for subscription in self._subscriptions:
            await subscription.unsubscribe()
        self._subscriptions.clear()
        if self._prefetches:
            await asyncio.gather(*self._prefetches, return_exceptions=True)

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
                return ModelReply(error=f"malformed {message_type.__name__}: {exc}")
            try:
                return await handler(request)
            except Exception as exc:  # a bug must not take the store down
                log.exception("models handler failed on %s", msg.subject)
                return ModelReply(error=f"model-store error: {exc}")

        return on_message

    # ------------------------------------------------------------------ registry

    async def refresh(self, force: bool = False) -> Registry:
        """The registry, re-scanned at most once a second (or now, with ``force``)."""
        async with self._scan_lock:
            if force or time.monotonic() - self._scanned_at >= RESCAN_INTERVAL_S:
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

    def _with_cache_state(self, info: ModelInfo) -> ModelInfo:
        path = self.cache.cached_path(info.name)
        return msgspec.structs.replace(
            info, cached=path is not None, cache_path=str(path) if path else None
        )

    async def _unknown(self, name: str) -> ModelReply:
        registry = await self.refresh()
        why = registry.problems.get(name)
        if why:
            return ModelReply(error=f"model {name!r} is registered but cannot be served: {why}")
        return ModelReply(error=f"model {name!r} is not registered")

    # ------------------------------------------------------------------ verbs

    async def on_list(self, _request: ListModels) -> ModelList:
        registry = await self.refresh()
        return ModelList([self._with_cache_state(m) for m in registry.models.values()])

    async def on_describe(self, request: DescribeModel) -> ModelReply:
        info = await self.lookup(request.name)
        if info is None:
            return await self._unknown(request.name)
        return ModelReply(model=self._with_cache_state(info))

    async def on_ensure(self, request: EnsureCached) -> ModelReply:
        info = await self.lookup(request.name)
        if info is None:
            return await self._unknown(request.name)
        too_large = self.check_fits_workers(info)
        if too_large:
            return ModelReply(error=too_large)
        result = "hit" if self.cache.cached_path(info.name) is not None else "miss"
        start = time.monotonic()
        try:
            path = await asyncio.to_thread(self.cache.ensure, info)
        except CacheError as exc:
            return ModelReply(error=str(exc))
        elapsed = time.monotonic() - start
        metrics.HOST_CACHE_ENSURE.labels(info.name, result).observe(elapsed)
        trace.get_current_span().set_attributes(
            {"aegaeon.model": info.name, "aegaeon.host_cache.result": result}
        )
        return ModelReply(model=msgspec.structs.replace(info, cached=True, cache_path=str(path)))

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
            return FileChunk(error=(await self._unknown(request.name)).error)
        return await asyncio.to_thread(read_chunk, Path(info.path), request)

    async def on_heartbeat(self, beat: Heartbeat, _msg: Msg) -> None:
        if beat.weight_budget_bytes > 0:
            self._budgets[beat.worker_id] = (beat.weight_budget_bytes, time.monotonic())

    def check_fits_workers(self, info: ModelInfo) -> str:
        """An error message when no live worker can hold the model's weights, else ''."""
        now = time.monotonic()
        budgets = [b for b, seen in self._budgets.values() if now - seen < HEARTBEAT_FRESH_S]
        if not budgets or info.weight_bytes <= max(budgets):
            return ""  # no worker has reported yet: let the worker decide
        return (
            f"model {info.name} has {info.weight_bytes} bytes of weights; the largest worker "
            f"weight budget is {max(budgets)} bytes, so no worker can load it"
        )


def read_chunk(model_dir: Path, request: FetchFile) -> FileChunk:
    """One chunk of a small, non-weight file directly inside a model folder."""
    name = request.file
    if not name or "/" in name or "\\" in name or name.startswith("."):
        return FileChunk(error=f"invalid file name {name!r}: a plain file name in the model folder")
    if name.endswith(WEIGHT_SUFFIXES):
        return FileChunk(error=f"{name} is a weights file: weights move through the host cache")
    path = model_dir / name
    if not path.is_file():
        return FileChunk(error=f"model {request.name!r} has no file {name!r}")
    total = path.stat().st_size
    if total > MAX_SERVED_FILE:
        return FileChunk(
            error=f"{name} is {total} bytes; only files up to {MAX_SERVED_FILE} are served"
        )
    if request.offset < 0 or request.length <= 0:
        return FileChunk(error="offset must be >= 0 and length > 0")
    with path.open("rb") as f:
        f.seek(request.offset)
        data = f.read(min(request.length, MAX_CHUNK))
    return FileChunk(data=data, total=total)


async def fetch_file(bus: Bus, model: str, file: str, timeout: float = 10.0) -> bytes:
    """Client side of ``models.file``: the whole file, chunk by chunk. Raises FileNotFoundError."""
    parts: list[bytes] = []
    offset, total = 0, None
    while total is None or offset < total:
        request = FetchFile(model, file, offset, MAX_CHUNK)
        chunk = await bus.request(bus.subjects.models("file"), request, FileChunk, timeout)
        if chunk.error:
            raise FileNotFoundError(chunk.error)
        total = chunk.total
        if not chunk.data and offset < total:
            raise OSError(f"{model}/{file}: empty chunk at offset {offset} of {total}")
        parts.append(chunk.data)
        offset += len(chunk.data)
    return b"".join(parts)
