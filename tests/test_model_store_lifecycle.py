"""The model-store's lifecycle verbs (deploy, drain, remove, serving) and its
``registry.changed`` news, on a real NATS server: states, serving settings (class, pin),
refusals, what a removal leaves behind, and two stores sharing a directory. Failures and a
restart: ``test_model_store_lifecycle_failures``."""

from __future__ import annotations

import asyncio
import json
import struct
import uuid
from pathlib import Path

import msgspec
import pytest
from aegaeon.model_store import admin
from aegaeon.model_store.host_cache import HostCache
from aegaeon.model_store.lifecycle import MARKS_FILE
from model_store_lifecycle_harness import (
    dirs,
    running_store,
    settings_heard,
    store,
    until,
)

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
    encode,
)

__all__ = ["dirs", "store"]  # fixtures, imported for pytest

pytestmark = pytest.mark.timeout(120)


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
