"""Bad model folders fail at registration with a clear error naming the file; close() cleans up."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from aegaeon.gpu_worker.engine import Engine, EngineConfig, ModelError

from aegaeon.protocol import SamplingParams


@pytest.fixture
def engine(tmp_path: Path):
    engine = Engine(
        EngineConfig(
            arena_bytes=256 << 20, host_kv_bytes=1 << 20, host_kv_dir=str(tmp_path / "shm")
        )
    )
    yield engine
    engine.close()


def _copy(demo_models_dir: Path, tmp_path: Path, name: str = "demo-llama") -> Path:
    folder = tmp_path / name
    shutil.copytree(demo_models_dir / name, folder)
    return folder


def test_unknown_architecture_is_named_with_its_config_file(engine, demo_models_dir, tmp_path):
    folder = _copy(demo_models_dir, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "mamba"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"config\.json.*mamba"):
        engine.register_model("m", folder)


def test_missing_weights_file_is_named(engine, demo_models_dir, tmp_path):
    folder = _copy(demo_models_dir, tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelError, match=r"model\.safetensors"):
        engine.register_model("m", folder)


def test_truncated_weights_file_is_named(engine, demo_models_dir, tmp_path):
    folder = _copy(demo_models_dir, tmp_path)
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ModelError, match=re.escape(str(path))):
        engine.register_model("m", folder)


def test_weights_missing_a_layer_tensor_are_named(engine, demo_models_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _copy(demo_models_dir, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ModelError, match="up_proj"):
        engine.register_model("m", folder)


def test_corrupt_config_json_is_named(engine, demo_models_dir, tmp_path):
    folder = _copy(demo_models_dir, tmp_path, "demo-gpt2")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match=r"config\.json"):
        engine.register_model("m", folder)


def test_out_of_vocabulary_prompt_is_rejected_at_admission(engine, demo_models_dir):
    engine.register_model("m", demo_models_dir / "demo-llama")
    with pytest.raises(ValueError, match="vocabulary"):
        engine.add_request("r", "m", [10**6], SamplingParams())


def test_close_removes_the_shared_memory_kv_file(tmp_path):
    engine = Engine(
        EngineConfig(arena_bytes=64 << 20, host_kv_bytes=1 << 20, host_kv_dir=str(tmp_path))
    )
    assert list(tmp_path.iterdir()) == [engine.host_kv.path]
    engine.close()
    assert list(tmp_path.iterdir()) == []


def test_switch_copies_weights_into_the_arena_instead_of_aliasing_the_cache(
    engine, demo_models_dir
):
    engine.register_model("m", demo_models_dir / "demo-llama")
    stats = engine.switch_to("m")
    assert stats.bytes == engine.specs["m"].weight_bytes and stats.seconds > 0
    arena = engine.arena.buffer
    embed = engine._native["llama"].embed
    start = arena.data_ptr()
    assert start <= embed.data_ptr() < start + arena.numel()
    assert engine.switch_to("m").bytes == 0  # already resident: a no-op
