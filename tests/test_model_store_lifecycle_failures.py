"""The model-store's lifecycle through failures, on a real NATS server: a load that fails, a
linked folder that went, a folder the scan refuses (each failed with why, and removable), a
restarted store, and a GGUF file converted on deploy and deleted on removal."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from aegaeon.model_store.host_cache import HostCache
from aegaeon.model_store.lifecycle import MARKS_FILE, LifecycleBook
from model_store_lifecycle_harness import (
    Store,
    dirs,
    running_store,
    store,
    until,
)
from test_gguf_import import gguf_file, source

from aegaeon.protocol import (
    DeployModel,
    DescribeModel,
    DrainModel,
    RemoveModel,
    SetServing,
    UnloadModel,
    UnloadReply,
)

__all__ = ["dirs", "gguf_file", "source", "store"]  # fixtures, imported for pytest

pytestmark = pytest.mark.timeout(120)


async def remove_as_the_gateway(store: Store, name: str) -> tuple[str, list[str]]:
    """`aegaeon models remove NAME`: the gateway's admin steps, with a scheduler that has
    nothing of the model in flight (every unload answered yes). (The removal's note, the names
    the gateway forgot.)"""
    from aegaeon.gateway.admin import remove as admin_remove

    async def unload(_request: UnloadModel, msg) -> None:
        await store.client.reply(msg, UnloadReply(True))

    await store.client.subscribe(store.client.subjects.unload_model, UnloadModel, unload)
    forgotten: list[str] = []
    gateway = SimpleNamespace(bus=store.client, models=SimpleNamespace(forget=forgotten.append))
    note = await admin_remove(gateway, name)  # type: ignore[arg-type]
    return note, forgotten


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

    note, forgotten = await remove_as_the_gateway(store, "alpha")
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

    await remove_as_the_gateway(store, "broken")
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
