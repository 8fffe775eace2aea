"""Weights from another node's host cache: a miss on this node copies the finished cache file of
a store that already holds it, instead of reading the models directory again.

Every store says in its heartbeat (``models.heartbeat``) what its cache holds and, when it runs
a transfer server (``--weights-transfer-address``), where it serves those files. On a miss this
store picks a fresh peer that caches the model, asks it over NATS (``models.share.<store id>``,
``ShareCached`` with the weights' signature: the peer's file must come from the same files) and
gets an offer (``SharedWeights``: endpoint, one-time token, size; the peer leases the file
meanwhile). The host cache then fetches the file over one TCP connection with a SHA-256 checksum
(``aegaeon/transfer.py``), checks the merged header's signature, and renames it into place; any
failure falls back to the models directory. The bytes never cross NATS::

    node A store                         node B store (caches m)
      ensure(m): miss
      ── ShareCached(m, signature) ─────►  lease m's file, offer it
      ◄──── SharedWeights(endpoint, token, nbytes)
      TCP: token ──────────────────────►  the file, then its SHA-256
      verify, rename: m cached on A
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aegaeon.bus import Bus
from aegaeon.protocol import ModelInfo, ShareCached, SharedWeights, StoreHeartbeat
from aegaeon.transfer import OFFER_TTL_S, TransferServer

if TYPE_CHECKING:
    from .host_cache import HostCache

log = logging.getLogger(__name__)

PEER_FRESH_S = 3.0
"""A peer's heartbeat older than this (three intervals) no longer says what it caches."""
SHARE_TIMEOUT_S = 2.0
PROGRESS_STEP = 0.25
"""A copy logs its progress every quarter of the file."""


@dataclass(frozen=True)
class PeerCopy:
    """An offer of a cached file from another node's store."""

    store_id: str
    endpoint: str
    token: bytes
    nbytes: int


class CopyProgress:
    """Logs a peer copy at each quarter of the file, then its rate."""

    def __init__(self, name: str, peer: PeerCopy) -> None:
        self.name, self.peer = name, peer
        self.started = time.monotonic()
        self.next_step = PROGRESS_STEP

    def __call__(self, received: int) -> None:
        share = received / self.peer.nbytes if self.peer.nbytes else 1.0
        if share < self.next_step:
            return
        while self.next_step <= share:
            self.next_step += PROGRESS_STEP
        seconds = max(time.monotonic() - self.started, 1e-9)
        log.info("copying %s from store %s: %.0f%% of %d bytes (%.2f GB/s)", self.name,
                 self.peer.store_id, 100 * share, self.peer.nbytes, received / seconds / 1e9)  # fmt: skip


class Peers:
    """Other nodes' stores as heard in their heartbeats, and both sides of a copy between host
    caches. ``await start()`` serves this cache's files when ``address`` is given."""

    def __init__(self, bus: Bus, cache: HostCache, store_id: str, address: str = "") -> None:
        self.bus, self.cache, self.store_id = bus, cache, store_id
        self.address = address
        self.server: TransferServer | None = None
        self._heard: dict[str, tuple[StoreHeartbeat, float]] = {}  # store id → (beat, seen at)
        self._offers = itertools.count()

    @property
    def endpoint(self) -> str:
        return self.server.endpoint if self.server is not None else ""

    async def start(self) -> None:
        if self.address:
            self.server = TransferServer(self.address)
            await self.server.start()

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()

    def heard(self, beat: StoreHeartbeat) -> None:
        if beat.store_id != self.store_id:
            self._heard[beat.store_id] = (beat, time.monotonic())

    def holders(self, name: str) -> list[StoreHeartbeat]:
        """Fresh peers that cache ``name`` and serve their files, most free cache first (a
        proxy for the least busy)."""
        now = time.monotonic()
        beats = [beat for beat, seen in self._heard.values()
                 if now - seen < PEER_FRESH_S and name in beat.cached and beat.transfer_endpoint]  # fmt: skip
        return sorted(beats, key=lambda b: -b.cache_bytes_free)

    async def ask(self, info: ModelInfo, signature: str) -> PeerCopy | None:
        """An offer of ``info``'s cache file from a peer holding the same weights (None: no
        peer has it, or none answered with an offer)."""
        for beat in self.holders(info.name):
            subject = self.bus.subjects.models(f"share.{beat.store_id}")
            try:
                reply = await self.bus.request(
                    subject, ShareCached(info.name, signature), SharedWeights, SHARE_TIMEOUT_S
                )
            except Exception as exc:  # gone since its heartbeat: try the next one
                log.info("store %s did not offer %s: %s", beat.store_id, info.name, exc)
                continue
            if reply.error:
                log.info("store %s did not offer %s: %s", beat.store_id, info.name, reply.error)
                continue
            return PeerCopy(beat.store_id, reply.endpoint, reply.token, reply.nbytes)
        return None

    async def on_share(self, request: ShareCached) -> SharedWeights:
        """Offer this cache's file of the model, leased until the offer lapses."""
        if self.server is None:
            return SharedWeights(error=f"store {self.store_id} serves no cached weights")
        entry = self.cache.lease(request.name, request.signature, OFFER_TTL_S)
        if entry is None:
            return SharedWeights(error=f"{request.name} is not cached here from those weights")
        key = f"weights:{request.name}:{next(self._offers)}"  # each asker its own offer
        token = self.server.offer(key, entry.path, 0, entry.nbytes)
        return SharedWeights(self.server.endpoint, token, entry.nbytes)
