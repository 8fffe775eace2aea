"""model-store: the shared-memory LRU host cache (alignment, eviction, leases, keep-alive,
restart)."""

from __future__ import annotations

import asyncio
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
from aegaeon.model_store import host_cache
from aegaeon.model_store.host_cache import CacheError, HostCache, cache_root
from aegaeon.model_store.layout import ALIGN
from aegaeon.model_store.registry import describe
from model_store_models import models_dir, write_model
from safetensors.numpy import load_file

from aegaeon.weights import read_index

__all__ = ["models_dir"]  # the fixture, shared through model_store_models

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
