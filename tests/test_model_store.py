"""model-store: the registry (describe, scan, register, models add/list) and what it refuses."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
from pathlib import Path

import pytest
from aegaeon.model_store.cli import register
from aegaeon.model_store.lifecycle import MARKS_FILE, LifecycleBook
from aegaeon.model_store.registry import ModelError, RegistryScanner, check_name, describe
from model_store_models import llama_tensors, model_nbytes, models_dir, write_model

from aegaeon.bus import Bus
from aegaeon.config import BusConfig
from aegaeon.protocol import (
    Heartbeat,
)

__all__ = ["models_dir"]  # the fixture, shared through model_store_models

# ---------------------------------------------------------------- registry


def test_describe_reads_sizes_from_config_and_headers(tmp_path: Path) -> None:
    tensors = write_model(tmp_path / "m", hidden=32, layers=2, heads=4, kv_heads=2)
    info = describe(tmp_path / "m")
    assert info.name == "m"
    assert info.architecture == "LlamaForCausalLM" and info.model_type == "llama"
    assert info.weight_bytes == model_nbytes(tensors)
    assert info.num_parameters == sum(t.size for t in tensors.values())
    assert info.context_length == 256
    assert info.dtype == "float32"
    assert info.kv_bytes_per_token == 2 * 2 * 2 * (32 // 4) * 4  # layers·(K,V)·kv_heads·head_dim·4


def test_sharded_model_is_described_as_one(models_dir: Path) -> None:
    info = describe(models_dir / "tiny-b")
    expected = llama_tensors(24, 2, 4, 2, 96, 2)
    assert info.weight_bytes == model_nbytes(expected)


def test_scan_lists_good_models_and_says_why_others_are_refused(tmp_path: Path) -> None:
    write_model(tmp_path / "good")
    write_model(tmp_path / "bad.name")
    write_model(tmp_path / "truncated")
    weights = tmp_path / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    (tmp_path / "no-config").mkdir()
    registry = RegistryScanner(tmp_path).scan()
    assert list(registry.models) == ["good"]
    assert "invalid model name" in registry.problems["bad.name"]
    assert "truncated" in registry.problems["truncated"]
    assert "config.json" in registry.problems["no-config"]


def test_rescan_sees_a_model_added_later(tmp_path: Path) -> None:
    scanner = RegistryScanner(tmp_path)
    assert scanner.scan().models == {}
    write_model(tmp_path / "late")
    assert list(scanner.scan().models) == ["late"]


@pytest.mark.parametrize("name", ["a.b", "x/y", "", "-lead", "has space", "w*", "n" * 65])
def test_unsafe_model_names_are_refused(name: str) -> None:
    with pytest.raises(ModelError):
        check_name(name)


def test_register_links_the_folder_under_its_name(models_dir: Path, tmp_path: Path) -> None:
    registry_dir = tmp_path / "reg"
    link = register(models_dir / "tiny-a", registry_dir, name="my-model")
    assert link.is_symlink() and link.resolve() == (models_dir / "tiny-a").resolve()
    assert list(RegistryScanner(registry_dir).scan().models) == ["my-model"]
    assert register(models_dir / "tiny-a", registry_dir, name="my-model") == link  # idempotent
    with pytest.raises(ModelError, match="already registered"):
        register(models_dir / "tiny-c", registry_dir, name="my-model")


def test_register_refuses_unsupported_or_unreadable_models(tmp_path: Path) -> None:
    write_model(tmp_path / "weird")
    config = json.loads((tmp_path / "weird" / "config.json").read_text())
    (tmp_path / "weird" / "config.json").write_text(json.dumps(config | {"model_type": "nope"}))
    with pytest.raises(ModelError, match="not supported"):
        register(tmp_path / "weird", tmp_path / "reg")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"config\.json"):
        register(tmp_path / "empty", tmp_path / "reg")
    assert not (tmp_path / "reg" / "weird").exists()


def test_a_model_added_under_a_name_does_not_inherit_a_stale_mark(models_dir: Path, tmp_path: Path) -> None:  # fmt: skip
    from aegaeon.cli import main

    registry_dir = tmp_path / "reg"
    registry_dir.mkdir()
    # Left by a model of that name whose folder went (a removal stopped half-way, or by hand).
    stale = {"tiny-c": {"state": "failed", "reason": "old", "origin": "import", "priority": "high",
                        "pin": 2, "keep_alive_s": 0.0}}  # fmt: skip
    (registry_dir / MARKS_FILE).write_text(json.dumps(stale))
    assert main(["models", "add", str(models_dir / "tiny-c"), "--models-dir", str(registry_dir)]) == 0  # fmt: skip
    book = LifecycleBook(registry_dir)
    assert book.state("tiny-c", registered=True) == "ready"  # was: failed, every request a 409
    assert (book.origin("tiny-c"), book.priority("tiny-c"), book.pin("tiny-c")) == (None, "normal", 0)  # fmt: skip


def test_a_folder_in_the_models_directory_itself_is_added_again_with_a_setting(models_dir: Path, tmp_path: Path) -> None:  # fmt: skip
    from aegaeon.cli import main

    registry_dir = tmp_path / "reg"
    shutil.copytree(models_dir / "tiny-a", registry_dir / "own")  # a demo model, a GGUF import
    add = ["models", "add", str(registry_dir / "own"), "--models-dir", str(registry_dir)]
    assert main([*add, "--pin", "1"]) == 0  # was: refused, "already registered"
    assert LifecycleBook(registry_dir).pin("own") == 1


def test_models_cli_adds_and_lists(models_dir: Path, tmp_path: Path, capsys) -> None:
    from aegaeon.cli import main

    registry_dir = tmp_path / "reg"
    assert (
        main(["models", "add", str(models_dir / "tiny-c"), "--models-dir", str(registry_dir)]) == 0
    )
    assert main(["models", "list", "--models-dir", str(registry_dir), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert [(m["name"], m["priority"], m["pin"]) for m in listed["models"]] == [("tiny-c", "normal", 0)]  # fmt: skip
    # Offline, into the lifecycle book: adding it again with a setting sets that setting.
    add = ["models", "add", str(models_dir / "tiny-c"), "--models-dir", str(registry_dir)]
    assert main([*add, "--priority", "high"]) == 0
    assert "(high priority)" in capsys.readouterr().out
    assert main([*add, "--pin", "2"]) == 0
    assert "(pinned on 2 instances)" in capsys.readouterr().out
    book = LifecycleBook(registry_dir)
    assert (book.priority("tiny-c"), book.pin("tiny-c")) == ("high", 2)  # the class stayed
    assert main(["models", "list", "--models-dir", str(registry_dir)]) == 0
    header, row = capsys.readouterr().out.splitlines()[:2]
    assert header.split()[-2:] == ["PRIORITY", "PIN"] and row.split()[-2:] == ["high", "2"]
    assert main(["models", "list", "--models-dir", str(registry_dir), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(m["priority"], m["pin"]) for m in listed["models"]] == [("high", 2)]
    with pytest.raises(SystemExit):
        main([*add, "--priority", "urgent"])
    assert "invalid choice: 'urgent'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # refused before anything is registered or recorded
        main([*add, "--pin", "-1"])
    assert (
        "argument --pin: pin must be a whole number of instances from 0" in capsys.readouterr().err
    )
    assert LifecycleBook(registry_dir).pin("tiny-c") == 2
    assert (
        main(["models", "add", str(tmp_path / "missing"), "--models-dir", str(registry_dir)]) == 1
    )
    assert "refused" in capsys.readouterr().err


def test_models_add_and_list_without_a_models_dir_use_the_one_the_running_stack_serves(
    models_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """While this user's ``aegaeon up --models-dir X`` runs (its connection file names X), a model
    added without ``--models-dir`` lands in X, where the stack sees it; with no stack running, in
    $AEGAEON_HOME/models."""
    from aegaeon.cli import main

    home, served = tmp_path / "home", tmp_path / "served"
    home.mkdir()
    monkeypatch.setenv("AEGAEON_HOME", str(home))
    (home / "connection.json").write_text(json.dumps({"AEGAEON_MODELS_DIR": str(served)}))
    assert main(["models", "add", str(models_dir / "tiny-c")]) == 0
    assert f"in {served}" in capsys.readouterr().out  # says which folder
    assert (served / "tiny-c").is_symlink() and not (home / "models").exists()
    assert main(["models", "list", "--json"]) == 0
    assert [m["name"] for m in json.loads(capsys.readouterr().out)["models"]] == ["tiny-c"]
    (home / "connection.json").unlink()  # the stack stopped
    assert main(["models", "add", str(models_dir / "tiny-a")]) == 0
    assert f"in {home / 'models'}" in capsys.readouterr().out
    assert (home / "models" / "tiny-a").is_symlink()


def test_a_link_whose_target_went_is_listed_as_not_servable_and_a_new_add_says_how_to_remove_it(
    models_dir: Path, tmp_path: Path, capsys
) -> None:
    from aegaeon.cli import main

    registry_dir, moved = tmp_path / "reg", tmp_path / "moved-away"
    shutil.copytree(models_dir / "tiny-a", moved)
    register(moved, registry_dir, name="gone")
    shutil.rmtree(moved)  # moved or deleted: the link dangles
    registry = RegistryScanner(registry_dir).scan()
    assert registry.models == {}
    assert f"links to {moved}, which is missing" in registry.problems.get("gone", "")  # was: hidden
    assert registry.broken_links == {"gone": moved}
    assert main(["models", "list", "--models-dir", str(registry_dir)]) == 0
    row = capsys.readouterr().out.splitlines()[1]
    assert row.startswith("gone") and "NOT SERVABLE" in row and str(moved) in row
    assert main(["models", "list", "--models-dir", str(registry_dir), "--json"]) == 0
    assert str(moved) in json.loads(capsys.readouterr().out)["problems"]["gone"]
    add = ["models", "add", str(models_dir / "tiny-c"), "--name", "gone"]
    assert main([*add, "--models-dir", str(registry_dir)]) == 1
    err = capsys.readouterr().err
    assert "aegaeon models remove gone" in err and f"rm {registry_dir / 'gone'}" in err


def test_a_model_larger_than_the_running_workers_slots_is_refused_at_registration(
    models_dir: Path, tmp_path: Path, nats_server, monkeypatch, capsys
) -> None:
    """With this user's stack running (its connection file), ``models add`` hears the workers'
    heartbeats and refuses a model none of their weight slots holds, saying what would fit."""
    from aegaeon.model_store import cli

    from aegaeon.cli import main

    home = tmp_path / "home"
    home.mkdir()
    (home / "connection.json").write_text(json.dumps({"AEGAEON_NATS_URL": nats_server.url}))
    monkeypatch.setenv("AEGAEON_HOME", str(home))
    monkeypatch.setenv("AEGAEON_PREFIX", "addcheck")
    monkeypatch.setattr(cli, "HEARTBEAT_WAIT_S", 1.0)
    weight_bytes = describe(models_dir / "tiny-c").weight_bytes

    async def beat_until(stop: asyncio.Event) -> None:
        bus = await Bus.connect(BusConfig(nats_url=nats_server.url, prefix="addcheck"), "w")
        while not stop.is_set():
            beat = Heartbeat("w1", "cpu", "both", 0.0, slot_bytes=weight_bytes // 2)
            await bus.publish(bus.subjects.heartbeat, beat)
            await asyncio.sleep(0.1)
        await bus.close()

    def run_with_worker(argv: list[str]) -> int:
        stop = asyncio.Event()
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_until_complete, args=(beat_until(stop),))
        thread.start()
        try:
            return main(argv)
        finally:
            loop.call_soon_threadsafe(stop.set)
            thread.join()
            loop.close()

    registry_dir = tmp_path / "reg"
    argv = ["models", "add", str(models_dir / "tiny-c"), "--models-dir", str(registry_dir)]
    assert run_with_worker(argv) == 1
    err = capsys.readouterr().err
    assert "largest weight slot" in err and "--arena-bytes" in err
    assert not (registry_dir / "tiny-c").exists()
    (home / "connection.json").unlink()  # no stack running: registered, sized at the next start
    assert main(argv) == 0


def test_malformed_folders_are_listed_as_problems_and_never_break_the_scan(
    models_dir: Path, tmp_path: Path
) -> None:
    registry_dir = tmp_path / "reg"
    registry_dir.mkdir()
    (registry_dir / "good").symlink_to(models_dir / "tiny-a")
    bad_dim = registry_dir / "bad-dim"
    write_model(bad_dim)
    config = json.loads((bad_dim / "config.json").read_text())
    (bad_dim / "config.json").write_text(json.dumps(config | {"num_hidden_layers": "many"}))
    for name, weight_map in (
        ("list-map", ["a", "b"]),
        ("escaping", {"w": "../outside.safetensors"}),
    ):
        folder = registry_dir / name
        write_model(folder)
        (folder / "model.safetensors").rename(folder / "part.safetensors")
        index = {"weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "outside.safetensors").write_bytes(b"")
    registry = RegistryScanner(registry_dir).scan()
    assert list(registry.models) == ["good"]
    assert set(registry.problems) == {"bad-dim", "list-map", "escaping"}
    assert "files of the folder" in registry.problems["escaping"]
