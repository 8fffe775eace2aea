"""What the model-store lifecycle tests share: a store running on a real NATS server under its
own prefix with a client that records every ``registry.changed`` news (``Store``), a host cache
whose loads wait for a gate (``GatedCache``), and the fixtures ``dirs`` (model folders) and
``store``."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aegaeon.model_store.host_cache import HostCache
from aegaeon.model_store.registry import RegistryScanner
from aegaeon.model_store.service import ModelStoreService
from model_store_models import write_model

from aegaeon.bus import Bus
from aegaeon.config import BusConfig
from aegaeon.protocol import (
    ListModels,
    ModelChanged,
    ModelList,
    ModelReply,
)


class GatedCache(HostCache):
    """A host cache whose loads wait until ``gate`` opens: a test sees ``loading`` for sure."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.gate.set()

    def ensure(self, info, lease_s: float = 0.0):
        assert self.gate.wait(20), "the test never opened the gate"
        return super().ensure(info, lease_s)


class Store:
    """A running store on its own prefix, a client, and every ModelChanged the client heard."""

    def __init__(self, service: ModelStoreService, client: Bus) -> None:
        self.service, self.client = service, client
        self.changes: list[ModelChanged] = []

    async def ask(self, verb: str, message) -> ModelReply:
        # A first deploy imports transformers (the architecture check): seconds on a busy CPU.
        subject = self.client.subjects.models(verb)
        return await self.client.request(subject, message, ModelReply, timeout=30)

    async def states(self) -> dict[str, str]:
        listed = await self.client.request(
            self.client.subjects.models("list"), ListModels(), ModelList
        )
        return {m.name: m.state for m in listed.models}

    async def until_state(self, name: str, state: str) -> None:
        for _ in range(400):
            if (await self.states()).get(name) == state:
                return
            await asyncio.sleep(0.025)
        raise AssertionError(f"{name} never became {state}: {await self.states()}")

    async def until_heard(self, name: str, state: str | None) -> ModelChanged:
        """The news that ``name`` became ``state`` (None: removed)."""
        for _ in range(200):
            for change in self.changes:
                if change.model.name == name and (
                    change.removed if state is None else change.model.state == state
                ):
                    return change
            await asyncio.sleep(0.025)
        raise AssertionError(f"never heard {name} → {state}: {self.changes}")


async def until(check, what: str, timeout_s: float = 30.0):
    """``check()``'s first answer that is not None, asked again until ``timeout_s`` passed."""
    deadline = time.monotonic() + timeout_s
    while (found := await check()) is None:
        assert time.monotonic() < deadline, f"never {what}"
        await asyncio.sleep(0.02)
    return found


async def settings_heard(store: Store, name: str, priority: str, pin: int) -> ModelChanged:
    async def heard() -> ModelChanged | None:
        return next((c for c in store.changes if c.model.name == name
                     and (c.model.priority, c.model.pin) == (priority, pin)), None)  # fmt: skip

    return await until(heard, f"heard {name} become {priority}, pin {pin}")


@contextlib.asynccontextmanager
async def running_store(
    nats_server, models_dir: Path, cache: HostCache, prefix: str
) -> AsyncIterator[Store]:
    config = BusConfig(nats_url=nats_server.url, prefix=prefix)
    server_bus = await Bus.connect(config, "model-store-test")
    client = await Bus.connect(config, "admin-test")
    service = ModelStoreService(server_bus, RegistryScanner(models_dir), cache, store_id="node-1")
    store = Store(service, client)

    async def heard(change: ModelChanged, _msg) -> None:
        store.changes.append(change)

    await client.subscribe(client.subjects.registry_changed, ModelChanged, heard)
    await client.nc.flush()
    await service.start()
    try:
        yield store
    finally:
        await service.stop()
        await server_bus.close()
        await client.close()


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    """(sources outside the registry: alpha, beta; the models directory: resident)."""
    sources, models = tmp_path / "sources", tmp_path / "models"
    write_model(sources / "alpha", seed=1)
    write_model(sources / "beta", seed=2)
    write_model(models / "resident", seed=3)
    return sources, models


@pytest.fixture
async def store(nats_server, dirs, tmp_path: Path) -> AsyncIterator[Store]:
    cache = GatedCache(tmp_path / "cache", 10**8)
    async with running_store(nats_server, dirs[1], cache, f"l{uuid.uuid4().hex[:8]}") as s:
        yield s
    cache.close()
