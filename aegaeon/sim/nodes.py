"""Nodes of a simulated fleet: each node's host-memory cache of model weights and the network
link that fills it.

Instances belong to nodes (:attr:`~aegaeon.scheduler.policies.base.InstanceView.node`; 8 GPUs
a node by default, :data:`aegaeon.sim.hardware.NODES`). A switch (or a prefetch) copies weights
host → device, as in :mod:`aegaeon.sim.instance`; on a fleet the weights must first be in the
node's host memory::

    node n03  host cache (LRU, e.g. 1 TiB)   [m017 m442 m101 …]
              network link (e.g. 20 GB/s)    fetch m230: queued behind the fetch in flight
    g024 switch to m442: cached     → rebind + host→device copy (as on one node)
    g025 switch to m230: not cached → wait for the fetch to the node, then the copy

A fetch brings the whole model from the shared model store or a peer node over the node's link,
one fetch at a time (first come, first served), and the model enters the cache (the least
recently used models leave to make room); a second instance asking for a model being fetched
waits for that fetch. The time a switch waits is part of the turn's simulated time (and of the
exposed switch time the worker reports).

Caches start warm, as a model store that spread the models over the nodes would leave them:
the models dealt round-robin over the nodes until every cache is full (with 500 paper-mix
models, ≈ 8.4 TB, and 1 TiB a node, each model is cached on about four of 32 nodes).

:class:`Fleet` answers the policies' locality hint
(:class:`~aegaeon.scheduler.policies.base.WeightLocality`): how long until a model is in a
node's host memory, at the simulated now. Locality off: the policies get no hint, and the
simulator still charges every fetch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from aegaeon.scheduler.policies.base import InstanceView


@dataclass(frozen=True)
class NodeSetup:
    """The fleet's nodes: GPUs a node, host cache a node, fetch bandwidth a node; whether the
    policies are told what each node caches."""

    gpus_per_node: int
    cache_bytes: int
    fetch_bytes_per_s: float
    locality: bool = True

    def to_json(self) -> dict:
        """The nodes' numbers (GB, GB/s)."""
        return {"gpus_per_node": self.gpus_per_node, "host_cache_gb": self.cache_bytes / 1e9,
                "fetch_gb_per_s": self.fetch_bytes_per_s / 1e9}  # fmt: skip


class NodeCache:
    """One node's cached weights (least recently used first) and its fetch link."""

    def __init__(self, capacity_bytes: int, fetch_bytes_per_s: float) -> None:
        self.capacity = capacity_bytes
        self.bandwidth = fetch_bytes_per_s
        self.models: OrderedDict[str, int] = OrderedDict()  # model → bytes
        self.used = 0
        self.ready: dict[str, float] = {}  # model → when its fetch ends (absent: long done)
        self.link_free = 0.0  # when the fetch in flight ends
        self.fetches = 0
        self.fetched_bytes = 0

    def __contains__(self, model: str) -> bool:
        return model in self.models

    def warm(self, model: str, size: int) -> bool:
        """Put ``model`` in the cache before the run when it fits (True: it did)."""
        if model in self.models or self.used + size > self.capacity:
            return False
        self.models[model] = size
        self.used += size
        return True

    def ready_at(self, model: str, size: int, t: float) -> float:
        """When ``model`` is in host memory, asked for at ``t``: at once when cached, at the
        end of its fetch when in flight, else after a fetch queued behind those in flight."""
        if model in self.models:
            self.models.move_to_end(model)
            return max(t, self.ready.get(model, t))
        start = max(t, self.link_free)
        end = start + size / self.bandwidth
        self.link_free = end
        self.fetches += 1
        self.fetched_bytes += size
        self._admit(model, size)
        self.ready[model] = end
        return end

    def fetch_s(self, model: str, size: int, t: float) -> float:
        """Seconds from ``t`` until ``model`` would be in host memory (changes nothing)."""
        if model in self.models:
            return max(0.0, self.ready.get(model, t) - t)
        return max(0.0, self.link_free - t) + size / self.bandwidth

    def _admit(self, model: str, size: int) -> None:
        while self.models and self.used + size > self.capacity:
            victim, freed = self.models.popitem(last=False)
            self.ready.pop(victim, None)
            self.used -= freed
        self.models[model] = size
        self.used += size


class Fleet:
    """Every node's cache, by node name; the policies' locality hint at the simulated now
    (the engine moves :attr:`now` on at each event)."""

    def __init__(
        self, nodes: Sequence[str], sizes: Mapping[str, int], setup: NodeSetup
    ) -> None:  # fmt: skip
        self.sizes = dict(sizes)
        self.setup = setup
        self.nodes = {n: NodeCache(setup.cache_bytes, setup.fetch_bytes_per_s) for n in nodes}
        self.now = 0.0
        self._warm()

    @classmethod
    def of(cls, views: Sequence[InstanceView], sizes: Mapping[str, int], setup: NodeSetup) -> Fleet:
        """The fleet of the nodes ``views`` are on."""
        return cls(list(dict.fromkeys(v.node for v in views if v.node is not None)), sizes, setup)

    def _warm(self) -> None:
        """Deal the models round-robin over the nodes (copy r of model j on node j + r) until
        a whole pass places none."""
        names = list(self.nodes)
        for r in range(len(names)):
            placed = False
            for j, (model, size) in enumerate(self.sizes.items()):
                placed |= self.nodes[names[(j + r) % len(names)]].warm(model, size)
            if not placed:
                break

    def cache(self, node: str | None) -> NodeCache | None:
        return self.nodes.get(node) if node is not None else None

    def fetch_s(self, node: str, model: str) -> float:
        """The locality hint (:class:`~aegaeon.scheduler.policies.base.WeightLocality`)."""
        cache = self.nodes.get(node)
        if cache is None or model not in self.sizes:
            return 0.0
        return cache.fetch_s(model, self.sizes[model], self.now)

    def stats(self) -> dict:
        """Fetches over the run, over all nodes."""
        return {"fetches": sum(c.fetches for c in self.nodes.values()),
                "fetched_gb": round(sum(c.fetched_bytes for c in self.nodes.values()) / 1e9, 1)}  # fmt: skip


def node_of(index: int, gpus_per_node: int) -> str:
    """The name of the node of the ``index``-th GPU."""
    return f"n{index // gpus_per_node:02d}"
