"""The weight slots: which model each holds, the background copy into the free one, the switch.

    arena: | slot 0: resident model (every step reads it) | slot 1: next model (prefetch) | KV |

A prefetch copies the next model's data section from its host mapping into a slot that is not
resident while the resident model keeps decoding. Every copy runs on one copy thread (torch's
``copy_`` releases the GIL), in chunks, so a copy that is no longer wanted stops at the next
chunk boundary:

- CUDA, pinned host pages: the thread queues the chunk copies on a dedicated copy stream with
  an event after each chunk and is done; nobody waits for the stream until a switch needs it.
- CPU (and CUDA from pageable pages, whose copies block the caller): chunk by chunk.

A switch to the model being prefetched waits only for what is left; one to a model already in
a slot rebinds views; anything else is copied in the foreground. A *pinned* model (the
scheduler keeps it resident on this instance) is never overwritten: once it fills the only
slot besides the resident one, other models switch through the resident slot, in the
foreground, and nothing else is prefetched. Rules that keep steps exact: the resident slot is
never a background copy target (only a foreground switch overwrites it); a slot is marked as
holding a model only once its copy has completed; views (and any dtype conversion) are made
only after that; a foreground copy first stops the background copy into the same slot.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from aegaeon.gpu_worker.arena import Arena, HostWeights, bind_views, map_host_weights
from aegaeon.gpu_worker.weights_loader import ModelSpec

CHUNK_BYTES = 32 << 20  # how far a cancelled CPU copy may run on; one event per chunk on CUDA

Binder = Callable[[torch.Tensor], dict[str, torch.Tensor]]  # a filled slot → its tensor views


@dataclass
class SlotSwitch:
    """What making a model resident took: its views, the bytes copied while the caller waited,
    and the bytes a prefetch had copied in the background before."""

    views: dict[str, torch.Tensor]
    waited_bytes: int
    prefetched_bytes: int


class _Copy:
    """One copy of a model's data section into a slot, run by the copy thread.

    The thread first maps (and on CUDA pins) the host file if this is the model's first copy:
    pinning gigabytes takes seconds and must not stall the steps either. Pinned pages are then
    copied as chunks queued on the copy stream with an event after each (the thread queues and
    returns); pageable ones chunk by chunk, blocking only this thread. ``stop`` is checked
    between chunks. After the last chunk (in stream order on CUDA) the thread binds the views,
    so a dtype conversion is paid in the background too, never before the bytes are in place.
    """

    def __init__(self, model: str, slot: int, nbytes: int, target: torch.Tensor, host: HostWeights | Callable[[], HostWeights], bind: Binder, executor: ThreadPoolExecutor, stream: torch.cuda.Stream | None, chunk: int) -> None:  # fmt: skip
        self.model, self.slot, self.nbytes = model, slot, nbytes
        self.views: dict[str, torch.Tensor] | None = None  # bound by the copy thread at the end
        self.host: HostWeights | None = None  # set by the copy thread once mapped
        self._done = 0  # bytes copied by blocking chunk copies (written by the copy thread)
        self._events: list[tuple[int, torch.cuda.Event]] = []  # (end, event) of queued chunks
        self._stop = threading.Event()
        if stream is not None:
            # The slot may still be read by the previous model's queued kernels: copy after them.
            stream.wait_stream(torch.cuda.current_stream(target.device))
        self._future: Future[None] = executor.submit(self._run, target, host, bind, stream, chunk)

    def _run(self, target: torch.Tensor, host: HostWeights | Callable[[], HostWeights], bind: Binder, stream: torch.cuda.Stream | None, chunk: int) -> None:  # fmt: skip
        # A new thread's current CUDA device is 0: map, pin and copy on the slot's device.
        with torch.cuda.device(target.device) if stream is not None else nullcontext():
            self.host = host if isinstance(host, HostWeights) else host()
        source = self.host.tensor
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            for start in range(0, source.numel(), chunk):
                if self._stop.is_set():
                    return
                end = min(start + chunk, source.numel())
                if stream is not None and self.host.pinned:
                    target[start:end].copy_(source[start:end], non_blocking=True)
                    event = torch.cuda.Event()
                    event.record(stream)
                    self._events.append((end, event))
                else:
                    target[start:end].copy_(source[start:end])
                    self._done = end
            self.views = bind(target)
            if stream is not None:  # conversions were queued after the copies: wait for them too
                event = torch.cuda.Event()
                event.record(stream)
                self._events.append((self.nbytes, event))

    def queued(self) -> bool:
        """The copy thread is done with this copy (queued it all, stopped, or failed)."""
        return self._future.done()

    def done_bytes(self) -> int:
        done = self._done
        for end, event in list(self._events):  # a stream completes its work in order
            if not event.query():
                break
            done = end
        return done

    def wait(self) -> None:
        """Until every byte is in the slot (raises what the copy raised)."""
        self._future.result()
        if self._events:
            self._events[-1][1].synchronize()

    def cancel(self) -> None:
        """Stop at the next chunk; on return nothing writes into the slot any more (queued
        device copies cannot be withdrawn: they are waited for, the host pages must outlive
        them anyway)."""
        self._stop.set()
        wait([self._future])  # a copy that failed is not wanted any more: no need to raise
        if self._events:
            self._events[-1][1].synchronize()


class WeightSlots:
    """The arena's weight slots and the host mappings they are filled from.

    Called from the engine's thread only; the copy thread touches nothing but a slot's bytes
    and a host mapping, both kept alive here until the copy is done or stopped.
    """

    def __init__(self, arena: Arena, dtype: torch.dtype, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.arena = arena
        self.device = arena.device
        self.dtype = dtype
        self.chunk_bytes = chunk_bytes
        count = len(arena.slots)
        self.models: list[str | None] = [None] * count  # set only once a copy has completed
        self._views: list[dict[str, torch.Tensor] | None] = [None] * count
        self._background: list[int] = [0] * count  # prefetched bytes not yet used by a switch
        self._resident: int | None = None
        self._host: dict[str, HostWeights] = {}
        self._copy: _Copy | None = None
        self.pinned: str | None = None  # never overwritten while it holds a slot
        cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if cuda else None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def resident_model(self) -> str | None:
        return None if self._resident is None else self.models[self._resident]

    @property
    def prefetching(self) -> str | None:
        """The model whose background copy has been started and not yet used by a switch."""
        return self._copy.model if self._copy is not None else None

    def copy_thread_busy(self) -> bool:
        """Whether the copy thread is still mapping, pinning or queueing a copy (its device
        copies may still run after: nothing but this thread's API calls is in the way of a
        CUDA graph capture)."""
        return self._copy is not None and not self._copy.queued()

    def copied_bytes(self, name: str, total: int) -> int:
        """How much of ``name``'s ``total`` bytes of weights is in a slot: all once a copy has
        completed, the part copied so far while one runs (read from any thread, for a progress
        report), else 0."""
        copy = self._copy
        if copy is not None and copy.model == name:
            return copy.done_bytes()
        return total if name in self.models else 0

    # ------------------------------------------------------------------ prefetch

    def start_prefetch(self, spec: ModelSpec) -> None:
        """Begin copying ``spec``'s weights into a free slot; returns without waiting."""
        name = spec.name
        if len(self.models) < 2 or name in self.models or self.prefetching == name:
            return
        slot = self._free_slot()
        if slot == self._resident:  # the pinned model holds the only other slot
            return
        self._stop_copy()
        self._copy = self._begin(spec, slot)

    def finish_prefetch(self) -> None:
        """Wait for the background copy in flight (if any); the slot then holds its model."""
        if self._copy is not None:
            self._copy.wait()
            self._complete(self._copy)

    # ------------------------------------------------------------------ switch

    def switch(self, spec: ModelSpec) -> SlotSwitch:
        """Make ``spec``'s model the resident one; copies only what no prefetch copied."""
        name = spec.name
        if self._copy is not None and self._copy.model == name:
            copy = self._copy
            prefetched = copy.done_bytes()
            copy.wait()
            self._complete(copy)
            waited, slot = copy.nbytes - prefetched, copy.slot
        elif name in self.models:
            slot = self.models.index(name)
            waited, prefetched = 0, self._background[slot]
        else:
            self._stop_copy()  # it may target the very slot this copy overwrites
            copy = self._copy = self._begin(spec, self._free_slot())  # seen by copied_bytes
            try:
                copy.wait()
            except BaseException:
                self._keep_host(copy)
                self._copy = None
                raise
            self._complete(copy)
            waited, prefetched, slot = copy.nbytes, 0, copy.slot
        self._background[slot] = 0
        views = self._views[slot]
        assert views is not None  # a completed copy bound them
        self._resident = slot
        return SlotSwitch(views, waited, prefetched)

    # ------------------------------------------------------------------ forget / close

    def forget(self, name: str) -> None:
        """Drop a model's host mapping and any slot holding it (its file changed or went)."""
        if self.prefetching == name:
            self._stop_copy()
        host = self._host.pop(name, None)
        if host is not None:
            host.release()
        for i, model in enumerate(self.models):
            if model == name:
                self._clear(i)
                if self._resident == i:
                    self._resident = None

    def release_stale_mappings(self) -> list[str]:
        """Drop the host mappings of files the host cache has evicted or replaced (none that a
        copy in flight reads); returns their models. The slots keep what they hold."""
        copying = self._copy.model if self._copy is not None else None
        stale = [name for name, host in self._host.items()
                 if name != copying and not host.is_current()]  # fmt: skip
        for name in stale:
            self._host.pop(name).release()
        return stale

    def invalidate(self) -> None:
        """Forget what every slot holds (someone wrote over them); the next switch copies."""
        self._stop_copy()
        for i in range(len(self.models)):
            self._clear(i)
        self._resident = None

    def close(self) -> None:
        """Stop the background copy and unpin every host mapping (the device is idle after)."""
        self.invalidate()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self.copy_stream is not None:
            self.copy_stream.synchronize()
        for name in list(self._host):
            self.forget(name)
        self._views = [None] * len(self._views)
        self._copy = None

    # ------------------------------------------------------------------ internals

    def _free_slot(self) -> int:
        """A slot that is neither resident nor the pinned model's: an empty one if any, else
        the first. With none (one slot, or the pinned model in the only other one) the
        resident slot, which only a foreground switch overwrites (nothing prefetches then)."""
        others = [i for i in range(len(self.models))
                  if i != self._resident and not self._holds_pinned(i)]  # fmt: skip
        if not others:
            resident = self._resident
            return resident if resident is not None and not self._holds_pinned(resident) else 0
        empty = [i for i in others if self.models[i] is None]
        return (empty or others)[0]

    def _holds_pinned(self, slot: int) -> bool:
        return self.pinned is not None and self.models[slot] == self.pinned

    def _begin(self, spec: ModelSpec, slot: int) -> _Copy:
        self._clear(slot)  # holds nothing until the copy completes
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="weight-copy")
        host: HostWeights | Callable[[], HostWeights] | None = self._host.get(spec.name)
        if isinstance(host, HostWeights) and not host.is_current():  # evicted, cached anew
            self._host.pop(spec.name).release()
            host = None
        if host is None:  # first copy of this file: the copy thread maps (and pins) it
            host = lambda: map_host_weights(spec, self.device)  # noqa: E731
        dtype = self.dtype

        def bind(target: torch.Tensor) -> dict[str, torch.Tensor]:
            return bind_views(target, spec, dtype)

        return _Copy(spec.name, slot, spec.index.data_bytes, self.arena.slots[slot], host, bind,
                     self._executor, self.copy_stream, self.chunk_bytes)  # fmt: skip

    def _complete(self, copy: _Copy) -> None:
        self._keep_host(copy)
        self._views[copy.slot] = copy.views
        self.models[copy.slot] = copy.model
        self._background[copy.slot] = copy.nbytes
        self._copy = None

    def _keep_host(self, copy: _Copy) -> None:
        """Keep the mapping the copy thread made (pinned once per model, kept across switches)."""
        if copy.host is not None and self._host.get(copy.model) is not copy.host:
            self._host[copy.model] = copy.host

    def _stop_copy(self) -> None:
        if self._copy is not None:
            self._copy.cancel()
            self._keep_host(self._copy)
            self._clear(self._copy.slot)
            self._copy = None

    def _clear(self, slot: int) -> None:
        self.models[slot] = None
        self._views[slot] = None
        self._background[slot] = 0
