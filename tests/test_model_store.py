"""model-store: registry, shared-memory LRU host cache, and the NATS service on a real server."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import uuid
from pathlib import Path

import msgspec
import numpy as np
import pytest
from aegaeon.model_store import host_cache
from aegaeon.model_store.cli import register
from aegaeon.model_store.files import fetch_file
from aegaeon.model_store.host_cache import CacheError, HostCache, cache_root
from aegaeon.model_store.layout import ALIGN
from aegaeon.model_store.lifecycle import MARKS_FILE, LifecycleBook
from aegaeon.model_store.registry import ModelError, RegistryScanner, check_name, describe
from aegaeon.model_store.service import ModelStoreService
from safetensors.numpy import load_file, save_file

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

# ---------------------------------------------------------------- tiny Llama-layout models


def llama_tensors(hidden: int, layers: int, heads: int, kv_heads: int, vocab: int, seed: int):
    """Random weights with the names and shapes of a Hugging Face Llama checkpoint."""
    rng = np.random.default_rng(seed)
    head_dim = hidden // heads
    inter = hidden * 2

    def w(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32)

    tensors = {"model.embed_tokens.weight": w(vocab, hidden), "model.norm.weight": w(hidden)}
    tensors["lm_head.weight"] = w(vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors |= {
            p + "self_attn.q_proj.weight": w(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": w(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": w(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": w(hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": w(inter, hidden),
            p + "mlp.up_proj.weight": w(inter, hidden),
            p + "mlp.down_proj.weight": w(hidden, inter),
            p + "input_layernorm.weight": w(hidden),
            p + "post_attention_layernorm.weight": w(hidden),
        }
    return tensors


def write_model(folder: Path, *, hidden=32, layers=2, heads=4, kv_heads=2, vocab=96, seed=0, shards=1):  # fmt: skip
    """A Hugging Face Llama folder: config.json, safetensors (optionally sharded), tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "intermediate_size": hidden * 2, "vocab_size": vocab, "max_position_embeddings": 256,
        "dtype": "float32", "rms_norm_eps": 1e-6,
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    tensors = llama_tensors(hidden, layers, heads, kv_heads, vocab, seed)
    names = list(tensors)
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"))
    else:
        weight_map = {}
        for k in range(shards):
            file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[k::shards]}
            save_file(part, str(folder / file))
            weight_map |= dict.fromkeys(part, file)
        index = {"metadata": {}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    # A tokenizer file bigger than two FetchFile chunks, to exercise chunking.
    vocab_json = {"model": {"vocab": {f"tok{i}": i for i in range(70_000)}}}
    (folder / "tokenizer.json").write_text(json.dumps(vocab_json))
    return tensors


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("registry")
    write_model(root / "tiny-a", seed=1)
    # hidden 24 makes norm weights 96 bytes: not a multiple of 64, so alignment gaps appear.
    write_model(root / "tiny-b", hidden=24, heads=4, kv_heads=2, seed=2, shards=3)
    write_model(root / "tiny-c", hidden=16, heads=2, kv_heads=1, seed=3)
    return root


def model_nbytes(tensors: dict[str, np.ndarray]) -> int:
    return sum(t.nbytes for t in tensors.values())


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


# ---------------------------------------------------------------- host cache


def test_cached_file_holds_every_tensor_aligned(models_dir: Path, tmp_path: Path) -> None:
    cache = HostCache(tmp_path / "cache", 10**8)
    path = cache.ensure(describe(models_dir / "tiny-b"))
    index = read_index(path)
    assert index.data_offset % ALIGN == 0
    assert all(entry.start % ALIGN == 0 for entry in index.tensors.values())
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    original = {}
    for shard in sorted((models_dir / "tiny-b").glob("model-*.safetensors")):
        original |= load_file(str(shard))
    assert set(index.tensors) == set(original)
    for name, entry in index.tensors.items():
        start = index.data_offset + entry.start
        got = np.frombuffer(raw[start : start + entry.nbytes], dtype=np.float32)
        np.testing.assert_array_equal(got.reshape(entry.shape), original[name])


def test_a_finished_load_is_counted_once(models_dir: Path, tmp_path: Path, monkeypatch) -> None:
    cache = HostCache(tmp_path / "cache", 10**8)
    counted: list[int] = []  # the cache's size as the load ends (its "cached" log line)

    def note(message: str, *_args) -> None:
        if message.startswith("cached"):
            counted.append(cache.used_bytes)

    monkeypatch.setattr(host_cache.log, "info", note)
    path = cache.ensure(describe(models_dir / "tiny-b"))
    assert (
        counted == [path.stat().st_size] == [cache.used_bytes]
    )  # not its file and its reservation


def test_lru_evicts_the_least_recently_used_model(models_dir: Path, tmp_path: Path) -> None:
    a, b, c = (describe(models_dir / n) for n in ("tiny-a", "tiny-b", "tiny-c"))
    probe = HostCache(tmp_path / "probe", 10**8)
    sizes = {m.name: probe.ensure(m).stat().st_size for m in (a, b, c)}
    probe.close()
    cache = HostCache(tmp_path / "cache", sizes["tiny-a"] + sizes["tiny-b"] + sizes["tiny-c"] - 1)
    path_a = cache.ensure(a)
    path_b = cache.ensure(b)
    cache.ensure(a)  # a is now the most recently used
    cache.ensure(c)  # needs room: b goes
    assert cache.names() == ["tiny-a", "tiny-c"]
    assert path_a.exists() and not path_b.exists()
    assert cache.used_bytes <= cache.capacity_bytes


def test_a_leased_model_is_not_evicted_until_its_lease_ends(models_dir: Path, tmp_path: Path) -> None:  # fmt: skip
    # A worker asked for a (lease); until it maps the file, another load must not unlink it.
    a, b, c = (describe(models_dir / n) for n in ("tiny-a", "tiny-b", "tiny-c"))
    probe = HostCache(tmp_path / "probe", 10**8)
    size = sum(probe.ensure(m).stat().st_size for m in (a, b, c))
    probe.close()
    now = [0.0]
    cache = HostCache(tmp_path / "cache", size - 1, clock=lambda: now[0])  # two fit, not three
    path_a = cache.ensure(a, lease_s=60)  # the least recently used, but leased
    cache.ensure(b)
    cache.ensure(c)  # needs room: b goes, though a is older
    assert cache.names() == ["tiny-a", "tiny-c"] and path_a.exists()
    cache.ensure(c, lease_s=60)
    with pytest.raises(CacheError, match="leased to workers"):
        cache.ensure(b)  # no room, and nothing may go
    now[0] = 61.0  # the leases ended: a (least recently used) goes
    cache.ensure(b)
    assert cache.names() == ["tiny-c", "tiny-b"] and not path_a.exists()


def test_a_model_idle_past_its_keep_alive_leaves_the_cache(models_dir: Path, tmp_path: Path) -> None:  # fmt: skip
    a, b = describe(models_dir / "tiny-a"), describe(models_dir / "tiny-b")
    now = [0.0]
    cache = HostCache(tmp_path / "cache", 10**8, clock=lambda: now[0])
    path_a = cache.ensure(a)
    now[0] = 200.0
    cache.ensure(b, lease_s=400)  # b is asked for now, and leased
    now[0] = 350.0
    assert cache.evict_idle(300) == ["tiny-a"] and not path_a.exists()
    now[0] = 700.0
    assert cache.evict_idle(300) == ["tiny-b"] and cache.names() == []


def test_a_model_the_scheduler_calls_idle_leaves_the_cache_once_no_lease_holds_it(models_dir: Path, tmp_path: Path) -> None:  # fmt: skip
    a = describe(models_dir / "tiny-a")
    now = [0.0]
    cache = HostCache(tmp_path / "cache", 10**8, clock=lambda: now[0])
    path = cache.ensure(a, lease_s=30)  # a worker maps it now
    assert cache.last_used("tiny-a") == 0.0
    now[0] = 10.0
    assert cache.evict_unless_leased("tiny-a") == 20.0 and path.exists()  # 20 s of lease left
    now[0] = 30.0
    assert cache.evict_unless_leased("tiny-a") is None and not path.exists()
    assert cache.names() == [] and cache.last_used("tiny-a") is None
    assert cache.evict_unless_leased("tiny-a") is None  # no longer cached


async def test_the_store_drops_idle_models_on_its_own(models_dir: Path, tmp_path: Path) -> None:
    from aegaeon.model_store.main import _evict_idle

    cache = HostCache(tmp_path / "cache", 10**8)
    cache.ensure(describe(models_dir / "tiny-a"))
    sweeper = asyncio.create_task(_evict_idle(cache, keep_alive_s=0.2))
    try:
        for _ in range(100):  # the sweep runs every 50 ms here
            if not cache.names():
                break
            await asyncio.sleep(0.05)
        assert cache.names() == []
    finally:
        sweeper.cancel()


def test_model_larger_than_the_cache_is_refused(models_dir: Path, tmp_path: Path) -> None:
    cache = HostCache(tmp_path / "cache", 1000)
    with pytest.raises(CacheError, match="capacity"):
        cache.ensure(describe(models_dir / "tiny-a"))
    assert list((tmp_path / "cache").iterdir()) == []


def test_changed_weights_are_cached_again(tmp_path: Path) -> None:
    write_model(tmp_path / "m", seed=1)
    cache = HostCache(tmp_path / "cache", 10**8)
    first = read_index(cache.ensure(describe(tmp_path / "m"))).metadata["aegaeon.signature"]
    write_model(tmp_path / "m", seed=9)
    second = read_index(cache.ensure(describe(tmp_path / "m"))).metadata["aegaeon.signature"]
    assert first != second


def test_concurrent_ensures_of_one_model_share_one_load(models_dir: Path, tmp_path: Path) -> None:
    from aegaeon.metrics import HOST_CACHE_MISSES

    cache = HostCache(tmp_path / "cache", 10**8)
    info = describe(models_dir / "tiny-a")
    misses_before = HOST_CACHE_MISSES._value.get()
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.ensure(info))) for _ in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results) == 6
    assert HOST_CACHE_MISSES._value.get() - misses_before == 1


def test_eviction_never_touches_a_model_being_written(models_dir: Path, tmp_path: Path) -> None:
    a, c = describe(models_dir / "tiny-a"), describe(models_dir / "tiny-c")
    cache = HostCache(tmp_path / "cache", 10**8)
    size_a, size_c = cache.ensure(a).stat().st_size, cache.ensure(c).stat().st_size
    cache.evict("tiny-a")
    cache.evict("tiny-c")
    cache.capacity_bytes = size_a + size_c - 1  # either fits alone, not both
    with cache._lock:  # a load of tiny-c in progress holds its bytes until its rename
        done = cache._reserve("tiny-c", size_c)
    with pytest.raises(CacheError, match="while other models are loading"):
        cache.ensure(a)
    assert cache._reserved == {"tiny-c": size_c} and not done.is_set()


def test_close_leaves_nothing_in_shared_memory(models_dir: Path) -> None:
    root = cache_root(f"test-{uuid.uuid4().hex[:8]}")
    cache = HostCache(root, 10**8)
    cache.ensure(describe(models_dir / "tiny-a"))
    assert root.is_dir() and any(root.iterdir())
    cache.close()
    assert not root.exists()


def test_restart_keeps_finished_files_and_drops_partial_ones(
    models_dir: Path, tmp_path: Path
) -> None:
    first = HostCache(tmp_path / "cache", 10**8)
    path = first.ensure(describe(models_dir / "tiny-a"))
    partial = tmp_path / "cache" / ".tiny-c.1234.tmp"
    partial.write_bytes(b"half a model")
    second = HostCache(tmp_path / "cache", 10**8)
    assert second.names() == ["tiny-a"] and path.exists()
    assert not partial.exists()


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
