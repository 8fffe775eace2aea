"""The model-store's lifecycle verbs, asked by the gateway's admin API: ``models.deploy``,
``models.drain``, ``models.remove``, ``models.serving``; and the ``registry.changed`` news each
move publishes.

::

    deploy ─► same checks as `aegaeon models add` (name, taken, readable, architecture,
              fits a worker's weight slot; a .gguf is converted) ─► link / folder ─► loading
              ─► background: copy into the host cache ─► ready  (or failed, with why)
    drain  ─► draining (the scheduler and gateways refuse new requests of it)
    remove ─► (the gateway had the scheduler unload it first) folder out, host cache out,
              mark out ─► absent  (an entry the scan refuses, a link whose target is gone
              included, is described as failed, so it is removed as a failed model is)
    serving ─► the model's priority class, pin and keep-alive in its mark (any state; the
               scheduler's policies weigh the class and keep a pinned model resident, and it
               evicts a model idle past its keep-alive)

Every move is checked by ``aegaeon.lifecycle`` and recorded in the book (``lifecycle.py``)
before it is announced, so a store that restarts, or another store sharing the directory,
reads the same state.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from aegaeon.lifecycle import Action, LifecycleError, next_state
from aegaeon.protocol import (
    DeployModel,
    DrainModel,
    ModelChanged,
    ModelReply,
    RemoveModel,
    SetServing,
)
from aegaeon.serving import settings_text

from .cli import NameTaken, model_name, register, taken_text
from .gguf_import import is_gguf_file
from .host_cache import CacheError
from .lifecycle import LifecycleBook, Origin, remove_entry
from .registry import ModelError

if TYPE_CHECKING:
    from .service import ModelStoreService

log = logging.getLogger(__name__)


def refused(status: int, message: str) -> ModelReply:
    return ModelReply(error=message, status=status)


class LifecycleVerbs:
    """Deploy, drain, remove and set the serving settings of models on one store's registry;
    ``loads`` are the loads in flight."""

    def __init__(self, service: ModelStoreService, book: LifecycleBook) -> None:
        self.service = service
        self.book = book
        self.loads: set[asyncio.Task] = set()

    @property
    def models_dir(self) -> Path:
        return self.service.scanner.models_dir

    async def announce(self, name: str, removed: ModelReply | None = None) -> None:
        """Tell every registry cache that ``name`` moved (or, with the removal's reply, went)."""
        if removed is not None and removed.model is not None:
            change = ModelChanged(removed.model, removed=True)
        else:
            info = await self.service.lookup(name)
            if info is None:
                return
            change = ModelChanged(self.service.current(info))
        await self.service.bus.publish(self.service.bus.subjects.registry_changed, change)

    # ------------------------------------------------------------------ deploy

    async def on_deploy(self, request: DeployModel) -> ModelReply:
        path = Path(request.path)
        if not path.is_absolute():
            return refused(
                400, f"{request.path!r}: give an absolute path on the model-store's node"
            )
        given = path.expanduser()
        try:
            name = model_name(given, request.name)
        except ModelError as exc:
            return refused(400, str(exc))
        registry = await self.service.refresh(force=True)
        if name in registry.broken_links:  # the book would call it ready: say how to remove it
            return refused(409, taken_text(self.models_dir / name, name))
        registered = name in registry.models or name in registry.problems
        origin: Origin = "import" if is_gguf_file(given) else "link"
        try:
            self.book.move(name, registered, "deploy", origin=origin,
                           priority=request.priority, pin=request.pin)  # fmt: skip
        except LifecycleError as exc:
            return refused(exc.status, exc.message)
        slot = self.service.largest_slot()
        try:
            await asyncio.to_thread(register, path, self.models_dir, name, slot)
        except Exception as exc:  # whatever it is, the name must not stay "loading"
            self.book.discard(name)
            if not isinstance(exc, ModelError | OSError):
                log.exception("registering %s from %s failed", name, path)
            return self._refusal(exc)
        info = await self.service.lookup(name)
        if info is None:  # registered, yet the scan refuses it: say why, and take it back
            why = await self.service.unknown(name)
            await asyncio.to_thread(remove_entry, self.models_dir, name, origin)
            self.book.discard(name)
            await self.service.refresh(force=True)
            return refused(400, why.error)
        self.start_load(name)
        settings = settings_text(request.priority, request.pin)
        log.info("deployed %s from %s (%s): loading", name, path, settings)
        await self.announce(name)
        return ModelReply(model=self.service.current(info))

    @staticmethod
    def _refusal(exc: Exception) -> ModelReply:
        if isinstance(exc, NameTaken):
            return refused(409, str(exc))
        if isinstance(exc, ModelError):
            return refused(400, str(exc))
        if isinstance(exc, OSError):
            return refused(500, f"The model-store cannot write its models directory: {exc}")
        return refused(500, f"The model-store failed to register the model: {exc!r} (see its log)")

    def start_load(self, name: str) -> None:
        """Copy ``name`` into the host cache in the background; its state follows the result."""
        task = asyncio.create_task(self._load(name), name=f"load {name}")
        self.loads.add(task)
        task.add_done_callback(self.loads.discard)

    async def _load(self, name: str) -> None:
        info = await self.service.lookup(name)
        if info is None:  # its folder went meanwhile (or never came: a restart mid-deploy)
            self.book.discard(name)
            return
        action: Action = "cached"
        reason = ""
        try:
            too_large = self.service.check_fits_workers(info)
            if too_large:
                raise CacheError(too_large)
            await asyncio.to_thread(self.service.cache.ensure, info)
        except Exception as exc:  # any failure is the model's, told as its reason
            action = "fail"
            reason = str(exc) if isinstance(exc, CacheError) else f"{type(exc).__name__}: {exc}"
            log.warning("loading %s failed: %s", name, reason)
        try:
            self.book.move(name, True, action, reason)
        except LifecycleError as exc:  # removed, or recorded by another store, meanwhile
            log.info("load of %s ended but not recorded: %s", name, exc.message)
            return
        await self.announce(name)

    def resume_loads(self) -> None:
        """At start: loads a previous run of a store left unfinished go on."""
        for name in self.book.loading():
            self.start_load(name)

    # ------------------------------------------------------------------ serving, drain, remove

    async def on_set_serving(self, request: SetServing) -> ModelReply:
        info = await self.service.lookup(request.name)
        self.book.reload_if_changed()  # a store sharing the directory may have written since
        try:
            self.book.set_serving(request.name, info is not None, request.priority, request.pin,
                                  request.keep_alive_s)  # fmt: skip
        except LifecycleError as exc:
            return refused(exc.status, exc.message)
        assert info is not None  # an absent model was refused above
        settings = settings_text(request.priority, request.pin, request.keep_alive_s)
        log.info("%s is now %s", request.name, settings)
        await self.announce(request.name)
        return ModelReply(model=self.service.current(info))

    async def on_drain(self, request: DrainModel) -> ModelReply:
        info = await self.service.lookup(request.name)
        try:
            self.book.move(request.name, info is not None, "drain")
        except LifecycleError as exc:
            return refused(exc.status, exc.message)
        assert info is not None  # an absent model's drain was refused above
        log.info("%s is draining", request.name)
        await self.announce(request.name)
        return ModelReply(model=self.service.current(info))

    async def on_remove(self, request: RemoveModel) -> ModelReply:
        """Only after the scheduler unloaded it (the gateway asks it first): no request of the
        model is queued or running, and none will be admitted. An entry the scan refused (a link
        whose target is gone, a broken folder) is a failed model (``unservable``): it goes as
        any entry does (a link unlinked, an import deleted, another folder set aside), and its
        mark whatever it says."""
        name = request.name
        info = await self.service.lookup(name)
        last = await self.service.unservable(name) if info is None else self.service.current(info)
        state = last.state if last is not None else self.book.state(name, False)  # absent, loading
        try:
            next_state(name, state, "remove")
        except LifecycleError as exc:
            return refused(exc.status, exc.message)
        assert last is not None  # an absent model (None) was refused above
        try:
            note = await asyncio.to_thread(remove_entry, self.models_dir, name, self.book.origin(name))  # fmt: skip
        except OSError as exc:
            return refused(500, f"The model-store cannot remove {name} from its directory: {exc}")
        self.service.cache.evict(name)
        await self.service.refresh(force=True)
        try:
            if info is None:  # an unservable entry's mark may say anything (ready, draining)
                self.book.discard(name)
            else:
                self.book.move(name, True, "remove")  # its mark goes with its folder
        except LifecycleError as exc:  # the folder is gone: a mark left behind reads as absent
            log.warning("removed %s but kept its stale mark: %s", name, exc.message)
        log.info("removed %s: %s", name, note)
        reply = ModelReply(model=msgspec.structs.replace(last, cached=False, cache_path=None), note=note)  # fmt: skip
        await self.announce(name, removed=reply)
        return reply
