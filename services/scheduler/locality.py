"""Where model weights are in the live fleet: the policies' locality hint
(:class:`~aegaeon.scheduler.policies.base.WeightLocality`), built from the model-stores'
heartbeats. Pure: the service hands it each heartbeat and the time; it does no I/O.

Each node's model-store says what its host cache holds (``models.heartbeat``); workers say which
node they are on (``Heartbeat.node`` → ``InstanceView.node``)::

    store s-a on node a: cached [m1, m2]      fetch_s("a", "m1") = 0
    store s-b on node b: cached [m3]          fetch_s("b", "m1") = weight bytes of m1 / bandwidth
    (s-b silent 3 beats: forgotten)           fetch_s("b", "m3") = bytes of m3 / bandwidth

A node whose store is not heard (or has none) caches nothing, as far as placement knows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from aegaeon.scheduler.policies.base import ModelSpec

from aegaeon.protocol import StoreHeartbeat

DEFAULT_FETCH_BYTES_PER_S = 2e9
"""How fast a node's model-store brings weights it does not cache into host memory: a read of
the models directory from a local NVMe disk, about 2 GB/s (a network volume is slower; set
``--fetch-gb-per-s``)."""

STALE_BEATS = 3
"""A store silent for this many of its heartbeat intervals is forgotten (as a worker is)."""


@dataclass(frozen=True)
class StoreSeen:
    """What one store last said, and when that stops counting (monotonic seconds)."""

    node: str
    cached: frozenset[str]
    stale_at: float


class NodeCaches:
    """Each node's cached models, from its stores' heartbeats; answers ``fetch_s(node, model)``.
    ``models``: the scheduler's registry (read live, for weight sizes)."""

    def __init__(
        self,
        models: Mapping[str, ModelSpec],
        fetch_bytes_per_s: float = DEFAULT_FETCH_BYTES_PER_S,
    ) -> None:
        if fetch_bytes_per_s <= 0:
            raise ValueError(f"fetch bandwidth must be positive, got {fetch_bytes_per_s}")
        self.models = models
        self.bandwidth = fetch_bytes_per_s
        self.stores: dict[str, StoreSeen] = {}  # store id → what it last said
        self._by_node: dict[str, frozenset[str]] = {}

    @property
    def known(self) -> bool:
        """Some store has been heard and is not stale: the hint says something."""
        return bool(self.stores)

    def heard(self, beat: StoreHeartbeat, now: float) -> None:
        """A store's heartbeat arrived at ``now``."""
        stale_at = now + STALE_BEATS * beat.interval_s
        self.stores[beat.store_id] = StoreSeen(beat.node, frozenset(beat.cached), stale_at)
        self._index()

    def expire(self, now: float) -> list[str]:
        """Forget the stores silent too long; returns their ids."""
        gone = [store_id for store_id, seen in self.stores.items() if now >= seen.stale_at]
        for store_id in gone:
            del self.stores[store_id]
        if gone:
            self._index()
        return gone

    def by_node(self) -> dict[str, list[str]]:
        """Node → the models its live stores cache (sorted), for observers."""
        return {node: sorted(models) for node, models in sorted(self._by_node.items())}

    def cached_on(self, node: str) -> frozenset[str]:
        """The models some live store of ``node`` caches."""
        return self._by_node.get(node, frozenset())

    def fetch_s(self, node: str, model: str) -> float:
        """0 when ``node`` caches ``model``, else its weights over the fetch bandwidth (0 for a
        model the registry does not know: nothing to weigh)."""
        if model in self.cached_on(node):
            return 0.0
        spec = self.models.get(model)
        return spec.weight_bytes / self.bandwidth if spec is not None else 0.0

    def _index(self) -> None:
        by_node: dict[str, set[str]] = {}
        for seen in self.stores.values():
            by_node.setdefault(seen.node, set()).update(seen.cached)
        self._by_node = {node: frozenset(models) for node, models in by_node.items()}
