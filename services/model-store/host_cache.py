"""The host model cache: model weights in shared memory, a byte capacity, LRU eviction.

Each cached model is ONE single-file safetensors (``layout.py``) at ``<root>/<model>.safetensors``,
where ``root`` is ``shm_dir()/aegaeon-<store-id>``. A worker maps that file and copies its data
section to its device in one bulk copy. Files are written to a hidden temp name and renamed into
place, so a reader never sees half a model; eviction only ever removes finished files (a worker
that has one mapped keeps its mapping: unlinking does not pull pages from under a live mmap), and
never one under a lease: ``ensure(info, lease_s)`` keeps the file at least that long, so the
worker that asked can map it before another model's load evicts it.

A miss loads the model from the models directory, or — when the service found another node's
store caching the same weights (``peers.py``) — copies that store's finished file over the
network, checksummed, falling back to the directory if the copy fails.

Thread-safe: ``ensure`` runs in worker threads of the service; two callers asking for the same
model share one load.
"""

from __future__ import annotations

import logging
import mmap
import os
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aegaeon.config import shm_dir
from aegaeon.metrics import HOST_CACHE_BYTES, HOST_CACHE_HITS, HOST_CACHE_MISSES
from aegaeon.protocol import ModelInfo
from aegaeon.transfer import TransferError, fetch
from aegaeon.weights import WeightsError, model_weight_files, read_index

from .layout import MergedLayout, plan_merge
from .peers import CopyProgress, PeerCopy

log = logging.getLogger(__name__)

COPY_CHUNK = 16 * 1024 * 1024
SIGNATURE_KEY = "aegaeon.signature"
SOURCE_KEY = "aegaeon.source"


class CacheError(RuntimeError):
    """A model cannot be put in the host cache (too large, shared memory full, unreadable)."""


def cache_root(store_id: str) -> Path:
    """Where a store keeps its cache: one folder per store under shared memory."""
    return shm_dir() / f"aegaeon-{store_id}"


def weights_signature(model_dir: str | Path) -> str:
    """Changes whenever any weight file of the model changes (size or modification time)."""
    parts = []
    for path in model_weight_files(model_dir):
        stat = path.stat()
        parts.append(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return "|".join(parts)


@dataclass
class CacheEntry:
    """One finished file in the cache."""

    name: str
    path: Path
    nbytes: int
    signature: str
    leased_until: float = 0.0  # the cache's clock: not evicted before
    last_used: float = 0.0  # the cache's clock: the last ensure that asked for it


def write_merged(layout: MergedLayout, target: Path) -> None:
    """Write ``layout`` to ``target`` through a temp file and an atomic rename."""
    temp = target.with_name(f".{target.stem}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with temp.open("wb") as out:
            out.truncate(layout.file_bytes)  # gaps between aligned tensors read as zeros
            out.write(layout.header)
            buffer = bytearray(COPY_CHUNK)
            for place in layout.placements:
                _copy_range(place.source, place.source_offset, out, layout.data_offset + place.offset, place.nbytes, buffer)  # fmt: skip
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def copy_from_peer(peer: PeerCopy, target: Path, name: str, nbytes: int, signature: str) -> bool:
    """Fetch another node's cache file of the model into ``target`` (through a temp file and an
    atomic rename), checksummed, and check that its header names the same source weights.
    False (logged) when the copy cannot be used: the caller loads from the models directory."""
    if peer.nbytes != nbytes:
        log.warning("store %s offers %s as %d bytes, %d expected: loading from disk",
                    peer.store_id, name, peer.nbytes, nbytes)  # fmt: skip
        return False
    temp = target.with_name(f".{target.stem}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with temp.open("w+b") as out:
            out.truncate(nbytes)
            with mmap.mmap(out.fileno(), nbytes) as mapped, memoryview(mapped) as into:
                fetch(peer.endpoint, peer.token, into, checksum=True,
                      progress=CopyProgress(name, peer))  # fmt: skip
        theirs = read_index(temp).metadata.get(SIGNATURE_KEY)
        if theirs != signature:
            raise TransferError(f"the copy was made from other weights ({theirs})")
        os.replace(temp, target)
        return True
    except (OSError, WeightsError) as exc:  # TransferError is an OSError
        log.warning("copy of %s from store %s failed (%s): loading from disk", name,
                    peer.store_id, exc)  # fmt: skip
        temp.unlink(missing_ok=True)
        return False


def _copy_range(source: Path, offset: int, out, out_offset: int, nbytes: int, buffer: bytearray) -> None:  # fmt: skip
    view = memoryview(buffer)
    out.seek(out_offset)
    with source.open("rb") as src:
        src.seek(offset)
        while nbytes > 0:
            got = src.readinto(view[: min(nbytes, len(view))])
            if not got:
                raise CacheError(f"{source}: file ended early (truncated weights)")
            out.write(view[:got])
            nbytes -= got


class HostCache:
    """Weights of recently used models in shared memory, at most ``capacity_bytes`` in total."""

    def __init__(
        self, root: str | Path, capacity_bytes: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"host cache capacity must be positive, got {capacity_bytes}")
        self.root = Path(root)
        self.capacity_bytes = capacity_bytes
        self.clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()  # least recently used first
        self._loading: dict[str, threading.Event] = {}
        self._reserved: dict[str, int] = {}
        self.peer_copies = 0  # misses filled from another node's cache (copy_from_peer)
        self.peer_bytes = 0
        self.root.mkdir(parents=True, exist_ok=True)
        self._adopt_existing()

    # ------------------------------------------------------------------ queries

    @property
    def used_bytes(self) -> int:
        """Bytes of finished files plus bytes reserved by loads in progress."""
        return sum(e.nbytes for e in self._entries.values()) + sum(self._reserved.values())

    def cached_path(self, name: str) -> Path | None:
        """The cache file of ``name`` if it is cached now (does not count as a use)."""
        entry = self._entries.get(name)
        return entry.path if entry else None

    def names(self) -> list[str]:
        """Cached models, least recently used first."""
        with self._lock:
            return list(self._entries)

    def contents(self) -> tuple[list[str], int]:
        """Cached models (least recently used first) and :attr:`used_bytes`, read together."""
        with self._lock:
            return list(self._entries), self.used_bytes

    # ------------------------------------------------------------------ ensure

    def signature(self, info: ModelInfo) -> str:
        """:func:`weights_signature` of the model's folder, or CacheError."""
        try:
            return weights_signature(info.path)
        except (WeightsError, OSError) as exc:
            raise CacheError(f"cannot cache {info.name}: {exc}") from None

    def ensure(self, info: ModelInfo, lease_s: float = 0.0, peer: PeerCopy | None = None) -> Path:
        """Make ``info``'s weights resident in the cache (load if needed) and return the file,
        kept at least ``lease_s`` seconds (the asker maps it meanwhile). On a miss, ``peer``
        (an offer of the same file from another node's cache) is tried before the disk."""
        signature = self.signature(info)
        layout: MergedLayout | None = None
        while True:
            with self._lock:
                entry = self._entries.get(info.name)
                if entry is not None and entry.signature == signature:
                    self._entries.move_to_end(info.name)  # the hit path reads no file
                    entry.last_used = self.clock()
                    entry.leased_until = max(entry.leased_until, entry.last_used + lease_s)
                    HOST_CACHE_HITS.inc()
                    return entry.path
                waiting = self._loading.get(info.name)
                if waiting is None and layout is not None:
                    done = self._reserve(info.name, layout.file_bytes)
                    break
            if waiting is not None:
                waiting.wait()  # another thread is loading this model: share its result
            else:
                layout = self._plan(info, signature)  # headers are read outside the lock
        return self._load(info, signature, layout, done, lease_s, peer)

    def _plan(self, info: ModelInfo, signature: str) -> MergedLayout:
        try:
            shards = [read_index(f) for f in model_weight_files(info.path)]
            metadata = {"format": "pt", SOURCE_KEY: info.path, SIGNATURE_KEY: signature}
            return plan_merge(shards, metadata)
        except (WeightsError, OSError, ValueError) as exc:
            raise CacheError(f"cannot cache {info.name}: {exc}") from None

    def _reserve(self, name: str, nbytes: int) -> threading.Event:
        """Make room (evicting least recently used finished files) and claim ``nbytes``. Locked."""
        if nbytes > self.capacity_bytes:
            raise CacheError(
                f"model {name} needs {nbytes} bytes, more than the host cache's capacity of "
                f"{self.capacity_bytes} bytes (raise --cache-bytes)"
            )
        stale = self._entries.get(name)
        if stale is not None:
            self._remove(stale)  # its weights changed on disk
        now = self.clock()
        evictable = [e for e in self._entries.values() if e.leased_until <= now]  # LRU first
        while self.used_bytes + nbytes > self.capacity_bytes and evictable:
            self._remove(evictable.pop(0))
        if self.used_bytes + nbytes > self.capacity_bytes:
            raise CacheError(
                f"host cache full: {name} needs {nbytes} bytes while other models are loading "
                "or leased to workers mapping them; retry, or raise --cache-bytes"
            )
        free = shutil.disk_usage(self.root).free
        if nbytes > free:
            raise CacheError(
                f"{self.root}: {free} bytes free in shared memory, {name} needs {nbytes} "
                "(size /dev/shm, e.g. docker shm_size)"
            )
        self._reserved[name] = nbytes
        done = self._loading[name] = threading.Event()
        return done

    def _load(self, info: ModelInfo, signature: str, layout: MergedLayout, done: threading.Event, lease_s: float, peer: PeerCopy | None) -> Path:  # fmt: skip
        target = self.root / f"{info.name}.safetensors"
        HOST_CACHE_MISSES.inc()
        try:
            copied = peer is not None and copy_from_peer(peer, target, info.name, layout.file_bytes, signature)  # fmt: skip
            if not copied:
                write_merged(layout, target)
        except OSError as exc:
            raise CacheError(f"cannot cache {info.name}: {exc}") from None
        else:
            with self._lock:
                now = self.clock()
                self._entries[info.name] = CacheEntry(
                    info.name, target, layout.file_bytes, signature, now + lease_s, now
                )
                self._reserved.pop(info.name, None)  # with the entry: never counted twice
                if copied:
                    self.peer_copies += 1
                    self.peer_bytes += layout.file_bytes
            source = f"store {peer.store_id}" if copied and peer else "the models directory"
            log.info("cached %s (%d bytes) at %s, from %s", info.name, layout.file_bytes, target, source)  # fmt: skip
            return target
        finally:
            with self._lock:
                self._reserved.pop(info.name, None)
                self._loading.pop(info.name, None)
                HOST_CACHE_BYTES.set(self.used_bytes)
            done.set()

    def lease(self, name: str, signature: str, lease_s: float) -> CacheEntry | None:
        """The finished file of ``name`` with this ``signature`` (None: not cached, or other
        weights), kept at least ``lease_s`` seconds: another node's store copies it meanwhile."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or entry.signature != signature:
                return None
            entry.leased_until = max(entry.leased_until, self.clock() + lease_s)
            return entry

    # ------------------------------------------------------------------ removal

    def evict_idle(self, keep_alive_s: float) -> list[str]:
        """Drop every model no ensure asked for in ``keep_alive_s`` seconds (and not leased):
        the shared memory goes back to the node. Returns their names."""
        with self._lock:
            now = self.clock()
            idle = [e for e in self._entries.values()
                    if now - e.last_used >= keep_alive_s and e.leased_until <= now]  # fmt: skip
            for entry in idle:
                self._remove(entry)
            return [e.name for e in idle]

    def last_used(self, name: str) -> float | None:
        """When an ensure last asked for ``name`` (the cache's clock); None: not cached."""
        with self._lock:
            entry = self._entries.get(name)
            return entry.last_used if entry is not None else None

    def evict_unless_leased(self, name: str) -> float | None:
        """Drop ``name`` unless a lease holds it: None when it is not (or no longer) cached,
        else the seconds until its lease ends."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                return None
            held = entry.leased_until - self.clock()
            if held > 0:
                return held
            self._remove(entry)
            return None

    def evict(self, name: str) -> bool:
        """Drop ``name`` from the cache; False when it was not cached."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None:
                self._remove(entry)
            return entry is not None

    def _remove(self, entry: CacheEntry) -> None:
        """Locked. Only finished entries are ever in ``_entries``, so no write is cut short."""
        del self._entries[entry.name]
        entry.path.unlink(missing_ok=True)
        HOST_CACHE_BYTES.set(self.used_bytes)
        log.info("evicted %s from the host cache", entry.name)

    def close(self) -> None:
        """Remove the whole cache folder from shared memory."""
        with self._lock:
            self._entries.clear()
        shutil.rmtree(self.root, ignore_errors=True)
        HOST_CACHE_BYTES.set(0)

    def _adopt_existing(self) -> None:
        """Keep finished files a previous run of this store left (a restart keeps its cache warm);
        remove temp files of interrupted writes and anything unreadable."""
        for temp in self.root.glob(".*.tmp"):
            temp.unlink(missing_ok=True)
        files = sorted(self.root.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
        for path in files:
            try:
                signature = read_index(path).metadata[SIGNATURE_KEY]
            except (WeightsError, KeyError):
                path.unlink(missing_ok=True)
                continue
            entry = CacheEntry(path.stem, path, path.stat().st_size, signature, 0.0, self.clock())
            self._entries[entry.name] = entry
        while self.used_bytes > self.capacity_bytes and self._entries:
            self._remove(next(iter(self._entries.values())))
