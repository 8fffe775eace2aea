"""The model-store's lifecycle verbs (deploy, drain, remove, serving) and its
``registry.changed`` news, on a real NATS server: states, serving settings (class, pin),
refusals, what a removal leaves behind, a restart, and two stores sharing a directory."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import struct
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import msgspec
import pytest
from aegaeon.model_store import admin
from aegaeon.model_store.host_cache import HostCache
from aegaeon.model_store.lifecycle import MARKS_FILE, LifecycleBook
from aegaeon.model_store.registry import RegistryScanner
from aegaeon.model_store.service import ModelStoreService
from model_store_models import write_model
from test_gguf_import import gguf_file, source

from aegaeon.bus import Bus
from aegaeon.config import BusConfig
from aegaeon.protocol import (
    DeployModel,
    DescribeModel,
    DrainModel,
    Heartbeat,
    ListModels,
    ModelChanged,
    ModelList,
    ModelReply,
    RemoveModel,
    SetServing,
    UnloadModel,
    UnloadReply,
    encode,
)

__all__ = ["gguf_file", "source"]  # fixtures, imported for pytest

pytestmark = pytest.mark.timeout(120)


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


async def test_a_model_found_in_the_models_directory_is_ready(store) -> None:
    assert await store.states() == {"resident": "ready"}


async def test_a_deployed_folder_is_linked_and_loading_until_the_host_cache_holds_it(
    store, dirs
) -> None:
    sources, models = dirs
    store.service.cache.gate.clear()
    reply = await store.ask("deploy", DeployModel(str(sources / "alpha"), "fresh"))
    assert reply.error == "" and reply.model is not None and reply.model.state == "loading"
    assert (models / "fresh").resolve() == sources / "alpha"
    assert (await store.states())["fresh"] == "loading"
    await store.until_heard("fresh", "loading")
    store.service.cache.gate.set()
    await store.until_state("fresh", "ready")
    await store.until_heard("fresh", "ready")
    described = await store.ask("describe", DescribeModel("fresh"))
    assert described.model.cached and described.model.cache_store == "node-1"


async def test_deploy_refuses_a_taken_name_a_bad_folder_or_path_and_a_model_no_slot_holds(
    store, dirs, tmp_path: Path
) -> None:
    sources, models = dirs
    taken = await store.ask("deploy", DeployModel(str(sources / "alpha"), "resident"))
    assert taken.status == 409 and "already registered" in taken.error
    (tmp_path / "empty").mkdir()
    unreadable = await store.ask("deploy", DeployModel(str(tmp_path / "empty")))
    assert unreadable.status == 400 and "no config.json" in unreadable.error
    relative = await store.ask("deploy", DeployModel("sources/alpha"))
    assert relative.status == 400 and "absolute path" in relative.error
    bad_name = await store.ask("deploy", DeployModel(str(sources / "alpha"), "no.dots"))
    assert bad_name.status == 400 and "invalid model name" in bad_name.error

    beat = Heartbeat("w0", "cpu", "both", 0.0, weight_budget_bytes=2000, slot_bytes=1000)
    await store.client.publish(store.client.subjects.heartbeat, beat)
    for _ in range(100):
        if store.service.largest_slot():
            break
        await asyncio.sleep(0.02)
    too_large = await store.ask("deploy", DeployModel(str(sources / "beta")))
    assert too_large.status == 400 and "largest weight slot" in too_large.error
    assert [p.name for p in models.iterdir() if not p.name.startswith(".")] == ["resident"]
    assert json.loads((models / MARKS_FILE).read_text()) == {}  # nothing left behind
    assert await store.states() == {"resident": "ready"} and store.changes == []


async def test_a_deploy_that_fails_unexpectedly_is_an_error_and_leaves_no_loading_name(
    store, dirs, monkeypatch
) -> None:
    sources, models = dirs
    # A header whose entries are valid JSON of the wrong types: refused as corrupt (400).
    weights = sources / "alpha" / "model.safetensors"
    raw = weights.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + size])
    first = next(k for k in header if k != "__metadata__")
    header[first]["shape"] = [None] * len(header[first]["shape"])
    text = json.dumps(header).encode()
    weights.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + size :])
    corrupt = await store.ask("deploy", DeployModel(str(sources / "alpha"), "corrupt"))
    assert corrupt.status == 400 and "corrupt entry" in corrupt.error, corrupt

    # Any other failure while registering is a 500 (was: an error in a 200 reply, the name
    # left "loading" for good, refused as taken by every later deploy and remove).
    def broken(*_args) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(admin, "register", broken)
    failed = await store.ask("deploy", DeployModel(str(sources / "beta"), "buggy"))
    assert failed.status == 500 and "a bug" in failed.error, failed
    assert json.loads((models / MARKS_FILE).read_text()) == {}  # nothing left "loading"
    assert await store.states() == {"resident": "ready"}


async def test_a_ready_model_is_drained_then_removed_from_the_directory_the_cache_and_the_book(
    store, dirs
) -> None:
    sources, models = dirs
    deployed = await store.ask("deploy", DeployModel(str(sources / "alpha"), priority="low", pin=2))  # fmt: skip
    assert (deployed.model.priority, deployed.model.pin) == ("low", 2)
    await store.until_state("alpha", "ready")
    assert store.service.cache.cached_path("alpha") is not None

    ready = await store.ask("remove", RemoveModel("alpha"))
    assert ready.status == 409 and "drain it first" in ready.error
    drained = await store.ask("drain", DrainModel("alpha"))
    assert (drained.model.state, drained.model.priority, drained.model.pin) == ("draining", "low", 2)  # fmt: skip
    assert (await store.ask("drain", DrainModel("alpha"))).model.state == "draining"  # again: same
    await store.until_heard("alpha", "draining")
    assert json.loads((models / MARKS_FILE).read_text())["alpha"]["state"] == "draining"

    removed = await store.ask("remove", RemoveModel("alpha"))
    assert removed.error == "" and "removed the link" in removed.note
    assert not (models / "alpha").is_symlink() and (sources / "alpha" / "config.json").exists()
    assert store.service.cache.cached_path("alpha") is None
    assert "alpha" not in json.loads((models / MARKS_FILE).read_text())  # its settings go too
    assert "alpha" not in await store.states()
    assert (await store.until_heard("alpha", None)).removed
    gone = await store.ask("remove", RemoveModel("alpha"))
    assert gone.status == 404 and "not registered" in gone.error
    again = (await store.ask("deploy", DeployModel(str(sources / "alpha")))).model  # a new model
    assert (again.state, again.priority, again.pin) == ("loading", "normal", 0)


async def test_a_models_settings_are_recorded_announced_and_described_and_bad_ones_refused(
    store, dirs
) -> None:
    models = dirs[1]
    reply = await store.ask("serving", SetServing("resident", priority="high"))
    assert reply.error == "" and reply.model is not None
    assert (reply.model.priority, reply.model.pin, reply.model.state) == ("high", 0, "ready")
    assert (await settings_heard(store, "resident", "high", 0)).model.state == "ready"
    pinned = await store.ask("serving", SetServing("resident", pin=3))  # the class stays
    assert (pinned.model.priority, pinned.model.pin) == ("high", 3)
    assert (await settings_heard(store, "resident", "high", 3)).model.state == "ready"
    entry = json.loads((models / MARKS_FILE).read_text())["resident"]
    assert (entry["priority"], entry["pin"]) == ("high", 3)
    listed = await store.client.request(store.client.subjects.models("list"), ListModels(), ModelList)  # fmt: skip
    assert [(m.priority, m.pin) for m in listed.models] == [("high", 3)]

    heard_before = len(store.changes)
    unknown = await store.ask("serving", SetServing("nope", "high"))
    assert unknown.status == 404 and "'nope' is not registered" in unknown.error
    for pin in (-1, 65):
        out_of_range = await store.ask("serving", SetServing("resident", "low", pin=pin))
        assert out_of_range.status == 400 and f"pin must be a whole number of instances from 0 (not pinned) to 64; got {pin}" in out_of_range.error  # fmt: skip
    nothing = await store.ask("serving", SetServing("resident"))
    assert nothing.status == 400 and "Nothing to set for 'resident'" in nothing.error
    subject = store.client.subjects.models("serving")
    for malformed, where in ((SetServing("resident", "urgent"), "'urgent' - at `$.priority`"),
                             (SetServing("resident", pin=1.5), "got `float` - at `$.pin`")):  # fmt: skip
        raw = await store.client.nc.request(subject, encode(malformed), timeout=30)
        bad = msgspec.msgpack.decode(raw.data, type=ModelReply)
        assert bad.status == 400 and where in bad.error  # the gateway names all of them first
    described = (await store.ask("describe", DescribeModel("resident"))).model
    assert (described.priority, described.pin) == ("high", 3)  # the refusals changed nothing
    unpinned = await store.ask("serving", SetServing("resident", pin=0))
    assert (unpinned.model.priority, unpinned.model.pin) == ("high", 0)

    async def news_since_refusals() -> list[ModelChanged] | None:
        return store.changes[heard_before:] or None

    # One store's news arrive in order: once the unpin's is heard, a refusal's would have been.
    news = await until(news_since_refusals, "heard the unpin")
    assert [(c.model.name, c.model.priority, c.model.pin) for c in news] == [("resident", "high", 0)]  # fmt: skip


async def test_two_stores_sharing_a_directory_agree_on_the_serving_settings(nats_server, dirs, tmp_path: Path) -> None:  # fmt: skip
    models = dirs[1]
    prefix = f"p{uuid.uuid4().hex[:8]}"
    caches = [HostCache(tmp_path / f"cache-{i}", 10**8) for i in range(2)]
    async with (
        running_store(nats_server, models, caches[0], prefix) as first,
        running_store(nats_server, models, caches[1], prefix) as second,
    ):
        await first.ask("serving", SetServing("resident", "low", pin=1))  # either store answers

        async def both_low() -> bool | None:
            views = [s.service.current(await s.service.lookup("resident")) for s in (first, second)]  # fmt: skip
            return True if all((v.priority, v.pin) == ("low", 1) for v in views) else None

        await until(both_low, "both stores read resident as low, pinned on 1")
    for cache in caches:
        cache.close()


async def test_an_unknown_model_cannot_be_drained(store) -> None:
    reply = await store.ask("drain", DrainModel("nope"))
    assert reply.status == 404 and "'nope' is not registered" in reply.error


async def test_a_load_that_fails_leaves_the_model_failed_with_why_and_removable(
    nats_server, dirs, tmp_path: Path
) -> None:
    sources, models = dirs
    cache = HostCache(tmp_path / "small-cache", 1000)  # smaller than any model
    async with running_store(nats_server, models, cache, f"f{uuid.uuid4().hex[:8]}") as s:
        await s.ask("deploy", DeployModel(str(sources / "alpha")))
        await s.until_state("alpha", "failed")
        failed = (await s.ask("describe", DescribeModel("alpha"))).model
        assert "host cache's capacity" in failed.state_reason
        drain = await s.ask("drain", DrainModel("alpha"))
        assert drain.status == 409 and "remove it instead" in drain.error
        removed = await s.ask("remove", RemoveModel("alpha"))
        assert removed.error == "" and "alpha" not in await s.states()
    cache.close()


async def test_a_model_whose_linked_folder_went_is_failed_with_why_and_removable(
    store, dirs
) -> None:
    """Its folder moved or deleted, a deployed model's link dangles: the store lists it no more,
    describes it as failed naming the missing folder (what the admin API's removal asks first),
    refuses its name to a deploy saying how to free it, and removes the link and its mark."""
    sources, models = dirs
    await store.ask("deploy", DeployModel(str(sources / "alpha"), priority="high"))
    await store.until_state("alpha", "ready")
    shutil.rmtree(sources / "alpha")

    async def listed_without_alpha() -> dict[str, str] | None:
        states = await store.states()  # the scan goes on, within a second without alpha
        return states if "alpha" not in states else None

    assert await until(listed_without_alpha, "listed without alpha") == {"resident": "ready"}
    described = (await store.ask("describe", DescribeModel("alpha"))).model
    assert described is not None and described.state == "failed"  # was: "not registered"
    assert f"links to {sources / 'alpha'}, which is missing" in described.state_reason
    taken = await store.ask("deploy", DeployModel(str(sources / "beta"), "alpha"))
    assert taken.status == 409 and f"rm {models / 'alpha'}" in taken.error

    # `aegaeon models remove alpha`: the gateway's steps, a scheduler with nothing of it in flight.
    from aegaeon.gateway.admin import remove as admin_remove

    async def unload(_request: UnloadModel, msg) -> None:
        await store.client.reply(msg, UnloadReply(True))

    await store.client.subscribe(store.client.subjects.unload_model, UnloadModel, unload)
    forgotten: list[str] = []
    gateway = SimpleNamespace(bus=store.client, models=SimpleNamespace(forget=forgotten.append))
    note = await admin_remove(gateway, "alpha")  # type: ignore[arg-type]
    assert "was already gone" in note and forgotten == ["alpha"]
    assert not (models / "alpha").is_symlink()
    assert "alpha" not in json.loads((models / MARKS_FILE).read_text())
    assert store.service.cache.cached_path("alpha") is None
    assert (await store.until_heard("alpha", None)).removed
    assert (await store.ask("remove", RemoveModel("alpha"))).status == 404


async def test_a_folder_the_scan_refuses_is_failed_with_why_and_removable(store, dirs) -> None:
    """A folder put in the models directory by hand with a broken config.json: described as
    failed with the scan's reason, and the admin API's removal sets it aside (bytes kept)."""
    _sources, models = dirs
    (models / "broken").mkdir()
    (models / "broken" / "config.json").write_text("{not json")
    described = (await store.ask("describe", DescribeModel("broken"))).model
    assert described is not None and described.state == "failed"  # was: "cannot be served"
    assert "config.json" in described.state_reason

    from aegaeon.gateway.admin import remove as admin_remove

    async def unload(_request: UnloadModel, msg) -> None:
        await store.client.reply(msg, UnloadReply(True))

    await store.client.subscribe(store.client.subjects.unload_model, UnloadModel, unload)
    gateway = SimpleNamespace(bus=store.client, models=SimpleNamespace(forget=lambda name: None))
    await admin_remove(gateway, "broken")  # type: ignore[arg-type]
    assert not (models / "broken").exists()
    assert [p.name.startswith(".removed-broken-") for p in models.iterdir() if "broken" in p.name] == [True]  # fmt: skip
    assert (await store.ask("describe", DescribeModel("broken"))).model is None


async def test_a_restarted_store_keeps_a_drain_and_finishes_a_load_left_unfinished(
    nats_server, dirs, tmp_path: Path
) -> None:
    sources, models = dirs
    prefix = f"r{uuid.uuid4().hex[:8]}"
    cache = HostCache(tmp_path / "cache", 10**8)
    async with running_store(nats_server, models, cache, prefix) as first:
        await first.ask("serving", SetServing("resident", "high", pin=2))
        await first.ask("drain", DrainModel("resident"))
    # A deploy whose store died after linking the folder, before its load ended:
    LifecycleBook(models).move("interrupted", False, "deploy")
    (models / "interrupted").symlink_to(sources / "beta")
    async with running_store(nats_server, models, cache, prefix) as second:
        assert (await second.states())["resident"] == "draining"
        described = (await second.ask("describe", DescribeModel("resident"))).model
        assert (described.priority, described.pin) == ("high", 2)
        await second.until_state("interrupted", "ready")
        assert second.service.cache.cached_path("interrupted") is not None
    cache.close()


async def test_a_deployed_gguf_file_is_converted_and_its_folder_deleted_on_removal(
    store, dirs, gguf_file: Path
) -> None:
    models = dirs[1]
    reply = await store.ask("deploy", DeployModel(str(gguf_file)))
    assert reply.error == "" and reply.model.name == "tiny-llama-F32"  # named as `models add` does
    folder = models / "tiny-llama-F32"
    assert folder.is_dir() and not folder.is_symlink() and (folder / "model.safetensors").exists()
    await store.until_state("tiny-llama-F32", "ready")
    await store.ask("drain", DrainModel("tiny-llama-F32"))
    removed = await store.ask("remove", RemoveModel("tiny-llama-F32"))
    assert "converted from GGUF" in removed.note and not folder.exists()
    assert gguf_file.exists()  # the source file is the user's
