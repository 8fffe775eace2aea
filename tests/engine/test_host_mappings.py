"""The engine's host mappings follow the node's host cache: a file the cache evicts (unlinks)
is unmapped, so its memory goes back to the cache, and a model cached anew at the same path is
copied from the new file, never from the old mapping. A worker sweeps its mappings on its own."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import numpy as np
from aegaeon.gpu_worker import residency
from aegaeon.gpu_worker.engine import Engine, EngineConfig
from aegaeon.gpu_worker.weights_loader import load_spec
from engine_helpers import GREEDY, PROMPTS, run_all
from worker_harness import GATEWAY, WorkerHarness

from aegaeon.protocol import AssignRequest, RunTurn, TurnDone

MODEL = "demo-llama"


def cached_copy(demo_models_dir: Path, folder: Path) -> Path:
    """The model's weights as the host cache holds them: a file of their own."""
    folder.mkdir(exist_ok=True)
    path = folder / f"{MODEL}.safetensors"
    shutil.copyfile(demo_models_dir / MODEL / "model.safetensors", path)
    return path


def mapped_files() -> str:
    return Path("/proc/self/maps").read_text()


def tokens(engine: Engine, rid: str) -> list[int]:
    engine.switch_to(MODEL)
    engine.add_request(rid, MODEL, PROMPTS[0], GREEDY)
    return [o.token_id for o in run_all(engine, [rid])[rid]]


def test_an_evicted_file_is_unmapped_and_the_others_are_kept(make_engine, demo_models_dir, tmp_path):  # fmt: skip
    path = cached_copy(demo_models_dir, tmp_path / "cache")
    engine = make_engine()
    engine.register_model(MODEL, demo_models_dir / MODEL, path)
    engine.switch_to(MODEL)
    engine.switch_to("demo-qwen2")
    assert engine.release_stale_host_mappings() == []  # every file is still the cache's
    path.unlink()  # the host cache evicts it
    assert f"{path} (deleted)" in mapped_files()
    assert engine.release_stale_host_mappings() == [MODEL]
    assert str(path) not in mapped_files()  # its pages are free
    engine.add_request("r", "demo-qwen2", PROMPTS[1], GREEDY)
    assert len(run_all(engine, ["r"])["r"]) == GREEDY.max_tokens


def test_a_model_cached_anew_at_the_same_path_is_copied_from_the_new_file(make_engine, demo_models_dir, tmp_path):  # fmt: skip
    path = cached_copy(demo_models_dir, tmp_path / "cache")
    engine = make_engine()
    engine.register_model(MODEL, demo_models_dir / MODEL, path)
    before = tokens(engine, "before")
    engine.switch_to("demo-qwen2")
    engine.switch_to("demo-mistral")  # the model is in no slot now: its next switch copies
    assert MODEL not in engine.slots.models
    # The cache evicts the file and writes the model again (here with other weights of the
    # same layout, so that which file was copied shows in the tokens).
    fresh = path.with_suffix(".new")
    shutil.copyfile(path, fresh)
    index = load_spec(MODEL, demo_models_dir / MODEL, fresh).index
    with open(fresh, "r+b") as f:
        f.seek(index.data_offset)
        data = np.frombuffer(f.read(index.data_bytes), dtype=np.float32).copy()
        data += np.random.default_rng(0).normal(0.0, 0.05, data.shape).astype(np.float32)
        f.seek(index.data_offset)
        f.write(data.tobytes())
    os.replace(fresh, path)
    reference = make_engine(None)
    reference.register_model(MODEL, demo_models_dir / MODEL, path)
    expected = tokens(reference, "reference")
    assert expected != before  # the new weights answer otherwise
    assert tokens(engine, "after") == expected
    assert f"{path} (deleted)" not in mapped_files()


def test_a_worker_unmaps_a_file_its_model_store_evicted(demo_models_dir, nats_server, redis_server, tmp_path, monkeypatch):  # fmt: skip
    models = tmp_path / "models"
    shutil.copytree(demo_models_dir / MODEL, models / MODEL)  # the harness's store serves these
    path = models / MODEL / "model.safetensors"
    monkeypatch.setattr(residency, "MAPPING_SWEEP_S", 0.05)
    engine = Engine(EngineConfig(device="cpu", dtype="float32", arena_bytes=256 << 20,
                                 host_kv_bytes=16 << 20, host_kv_dir=str(tmp_path)))  # fmt: skip

    async def run() -> None:
        async with WorkerHarness(engine, models, nats_server.url, redis_server.url) as w:
            await w.send(AssignRequest("r", MODEL, PROMPTS[0], GREEDY, GATEWAY, 0.0))
            await w.send(RunTurn(1, MODEL, ["r"], quota_s=1e6))
            assert isinstance(await w.turn_ended(), TurnDone)
            assert str(path) in mapped_files()
            path.unlink()  # the store evicts the model
            async with asyncio.timeout(30):
                while str(path) in mapped_files():
                    await asyncio.sleep(0.02)

    try:
        asyncio.run(run())
    finally:
        engine.close()
