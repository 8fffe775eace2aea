"""Weights from another node's host cache (``model-store/peers.py``): two model-store services on
the real NATS server, each its own store id and shared-memory cache (as on two nodes), sharing
the models directory. A miss on one copies the other's cached file over TCP, checksummed,
byte for byte what a load from the directory makes; a peer that cannot serve it leaves the
miss to the directory."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest
from aegaeon.model_store.host_cache import HostCache
from aegaeon.model_store.registry import RegistryScanner
from aegaeon.model_store.service import ModelStoreService
from model_store_models import models_dir
from test_transfer import sent

from aegaeon.bus import Bus
from aegaeon.config import BusConfig
from aegaeon.protocol import EnsureCached, ModelReply, ShareCached, SharedWeights

__all__ = ["models_dir"]  # the fixture, shared through model_store_models

MODEL = "tiny-a"


@pytest.fixture
async def two_nodes(nats_server, models_dir: Path, tmp_path: Path):
    """Stores "node-a" and "node-b", each serving its cache files on the loopback."""
    config = BusConfig(nats_url=nats_server.url, prefix=f"t{uuid.uuid4().hex[:8]}")
    buses, stores = [], {}
    for store_id in ("node-a", "node-b"):
        bus = await Bus.connect(config, f"model-store-{store_id}")
        cache = HostCache(tmp_path / store_id, 10**8)
        store = ModelStoreService(bus, RegistryScanner(models_dir), cache, store_id=store_id,
                                  node=store_id, transfer_address="127.0.0.1:0")  # fmt: skip
        await store.start()
        buses.append(bus)
        stores[store_id] = store
    client = await Bus.connect(config, "client-test")
    yield stores, client
    for store in stores.values():
        await store.stop()
        store.cache.close()
    for bus in [*buses, client]:
        await bus.close()


async def ensure_on(client: Bus, store_id: str, name: str = MODEL) -> Path:
    subject = client.subjects.models(f"ensure.{store_id}")
    reply = await client.request(subject, EnsureCached(name), ModelReply, timeout=30)
    assert reply.error == "" and reply.model is not None, reply.error
    return Path(reply.model.cache_path or "")


async def until_heard(store: ModelStoreService, name: str = MODEL) -> None:
    """Until ``store`` has heard a peer's heartbeat saying it caches ``name``."""
    deadline = time.monotonic() + 10
    while not store.peers.holders(name):
        assert time.monotonic() < deadline, "no peer heartbeat named the model"
        await asyncio.sleep(0.05)


async def test_a_miss_copies_the_cache_file_of_the_node_that_holds_it(two_nodes) -> None:
    stores, client = two_nodes
    a, b = stores["node-a"], stores["node-b"]
    on_a = await ensure_on(client, "node-a")  # from the models directory
    await until_heard(b)
    on_b = await ensure_on(client, "node-b")
    assert on_b != on_a and on_b.parent == b.cache.root
    assert on_b.read_bytes() == on_a.read_bytes()
    assert (b.cache.peer_copies, b.cache.peer_bytes) == (1, on_a.stat().st_size)
    assert a.cache.peer_copies == 0
    assert a.peers.server is not None
    await sent(a.peers.server, on_a.stat().st_size)
    beat = b.heartbeat()
    assert (beat.peer_loads, beat.peer_bytes) == (1, on_a.stat().st_size)
    assert beat.transfer_endpoint == b.peers.endpoint and beat.transfer_endpoint
    assert MODEL in beat.cached


async def test_a_peer_that_cannot_serve_leaves_the_miss_to_the_models_directory(two_nodes, models_dir: Path, tmp_path: Path) -> None:  # fmt: skip
    stores, client = two_nodes
    a, b = stores["node-a"], stores["node-b"]
    await ensure_on(client, "node-a")
    await until_heard(b)
    assert a.peers.server is not None
    await a.peers.server.stop()  # its heartbeat still offers it; the connection is refused
    on_b = await ensure_on(client, "node-b")
    assert b.cache.peer_copies == 0
    direct = HostCache(tmp_path / "direct", 10**8)
    try:
        expected = direct.ensure((await b.lookup(MODEL)) or pytest.fail("not registered"))
        assert on_b.read_bytes() == expected.read_bytes()
    finally:
        direct.close()


async def test_a_peer_offers_only_a_file_made_from_the_same_weights(two_nodes) -> None:
    stores, client = two_nodes
    a = stores["node-a"]
    await ensure_on(client, "node-a")
    subject = client.subjects.models("share.node-a")
    stale = await client.request(subject, ShareCached(MODEL, "other:1:2"), SharedWeights, 5)
    assert "not cached here from those weights" in stale.error and not stale.token
    info = await a.lookup(MODEL)
    assert info is not None
    good = await client.request(subject, ShareCached(MODEL, a.cache.signature(info)), SharedWeights, 5)  # fmt: skip
    assert good.error == "" and good.endpoint == a.peers.endpoint and len(good.token) == 16
