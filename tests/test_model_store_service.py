"""model-store: the NATS service on a real server (list, ensure, heartbeat, files, prefetch)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import msgspec
import pytest
from aegaeon.model_store.files import fetch_file
from aegaeon.model_store.host_cache import HostCache
from aegaeon.model_store.registry import RegistryScanner
from aegaeon.model_store.service import ModelStoreService
from model_store_models import models_dir

from aegaeon.bus import Bus
from aegaeon.config import BusConfig
from aegaeon.protocol import (
    DescribeModel,
    EnsureCached,
    FetchFile,
    FileChunk,
    Heartbeat,
    ListModels,
    ModelList,
    ModelReply,
    PrefetchHint,
    StoreHeartbeat,
)
from aegaeon.weights import read_index

__all__ = ["models_dir"]  # the fixture, shared through model_store_models

# ---------------------------------------------------------------- NATS service


@pytest.fixture
async def store(nats_server, models_dir: Path, tmp_path: Path):
    """A model-store service and a client bus, both on the real NATS server."""
    config = BusConfig(nats_url=nats_server.url, prefix=f"t{uuid.uuid4().hex[:8]}")
    server_bus = await Bus.connect(config, "model-store-test")
    client = await Bus.connect(config, "client-test")
    cache = HostCache(tmp_path / "cache", 10**8)
    service = ModelStoreService(server_bus, RegistryScanner(models_dir), cache, store_id="node-7")
    await service.start()
    yield service, client
    await service.stop()
    await server_bus.close()
    await client.close()
    cache.close()


async def test_service_lists_every_registered_model(store) -> None:
    _service, client = store
    reply = await client.request(client.subjects.models("list"), ListModels(), ModelList)
    assert sorted(m.name for m in reply.models) == ["tiny-a", "tiny-b", "tiny-c"]
    assert not any(m.cached for m in reply.models)


async def test_service_ensure_returns_a_readable_cache_file(store) -> None:
    _service, client = store
    reply = await client.request(
        client.subjects.models("ensure"), EnsureCached("tiny-a"), ModelReply
    )
    assert reply.error == "" and reply.model is not None and reply.model.cached
    assert reply.model.cache_path is not None
    assert len(read_index(reply.model.cache_path).tensors) == 3 + 2 * 9
    described = await client.request(
        client.subjects.models("describe"), DescribeModel("tiny-a"), ModelReply
    )
    assert described.model.cache_path == reply.model.cache_path


async def test_service_answers_ensure_on_its_node_local_subject(store) -> None:
    _service, client = store
    subject = client.subjects.models("ensure.node-7")
    reply = await client.request(subject, EnsureCached("tiny-c"), ModelReply)
    assert reply.model is not None and reply.model.cache_path


async def test_service_heartbeat_says_what_its_host_cache_holds_and_on_which_node(store) -> None:
    service, client = store
    beats: list[StoreHeartbeat] = []

    async def heard(beat: StoreHeartbeat, _msg) -> None:
        beats.append(beat)

    await client.subscribe(client.subjects.store_heartbeat, StoreHeartbeat, heard)
    await client.request(client.subjects.models("ensure"), EnsureCached("tiny-b"), ModelReply)
    for _ in range(300):  # one beat a second: at most a few
        if any("tiny-b" in b.cached for b in beats):
            break
        await asyncio.sleep(0.01)
    beat = next(b for b in beats if "tiny-b" in b.cached)
    assert (beat.store_id, beat.node, beat.cached) == ("node-7", service.node, ["tiny-b"])
    assert 0 < beat.cache_bytes_free < beat.cache_bytes_total == 10**8


async def test_service_names_unknown_models_in_its_errors(store) -> None:
    _service, client = store
    for verb, message in (("describe", DescribeModel("nope")), ("ensure", EnsureCached("nope"))):
        reply = await client.request(client.subjects.models(verb), message, ModelReply)
        assert reply.model is None and "'nope' is not registered" in reply.error


async def test_service_answers_malformed_requests_with_an_error(store) -> None:
    _service, client = store
    msg = await client.nc.request(client.subjects.models("ensure"), b"\x93garbage", timeout=5)
    reply = msgspec.msgpack.decode(msg.data, type=ModelReply)
    assert "malformed" in reply.error and reply.status == 400


async def test_service_sends_tokenizer_files_in_chunks(store, models_dir: Path) -> None:
    _service, client = store
    expected = (models_dir / "tiny-a" / "tokenizer.json").read_bytes()
    assert len(expected) > 2 * 512 * 1024
    assert await fetch_file(client, "tiny-a", "tokenizer.json") == expected


@pytest.mark.parametrize("file", ["../tiny-b/config.json", "model.safetensors", ".hidden", "nope"])
async def test_service_refuses_files_outside_the_small_file_set(store, file: str) -> None:
    _service, client = store
    chunk = await client.request(
        client.subjects.models("file"), FetchFile("tiny-a", file), FileChunk
    )
    assert chunk.error and chunk.data == b""


async def test_prefetch_hint_warms_the_cache(store) -> None:
    service, client = store
    await client.publish(client.subjects.models("prefetch"), PrefetchHint("tiny-c"))
    for _ in range(100):
        if service.cache.cached_path("tiny-c"):
            break
        await asyncio.sleep(0.05)
    assert service.cache.cached_path("tiny-c") is not None


async def test_ensure_refuses_a_model_no_worker_can_hold(store) -> None:
    service, client = store
    beat = Heartbeat("w0", "cpu", "both", 0.0, weight_budget_bytes=1000)
    await client.publish(client.subjects.heartbeat, beat)
    for _ in range(100):
        if service._budgets:
            break
        await asyncio.sleep(0.02)
    reply = await client.request(
        client.subjects.models("ensure"), EnsureCached("tiny-b"), ModelReply
    )
    assert "no worker can load it" in reply.error
    assert service.cache.cached_path("tiny-b") is None
