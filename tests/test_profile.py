"""``aegaeon profile``: it measures the real engine, writes a profile the scheduler loads, and the
fitted times predict a fresh measurement; ``aegaeon up`` hands that profile to the scheduler."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from aegaeon.scheduler.estimators import Estimator, ModelProfile, load_estimator
from aegaeon.scheduler.policies.base import ModelSpec
from aegaeon.scheduler.profile import (
    Grid,
    Profiler,
    fit_quality,
    fit_switches,
    merged_json,
    profile_models,
)

from aegaeon import cli
from aegaeon.stack_plan import plan_children, profile_path

MODELS = ["demo-llama", "demo-qwen2"]
TINY = Grid(((16,), (96,), (32, 32), (64, 64, 64)), (1, 3), (24, 120), 2, 2, 2)


def specs(models_dir: Path, names: list[str]) -> dict[str, ModelSpec]:
    """What the scheduler knows of each model (sizes only)."""
    from aegaeon.gpu_worker.weights_loader import load_spec

    out = {}
    for name in names:
        spec = load_spec(name, models_dir / name)
        out[name] = ModelSpec(name, spec.weight_bytes, 1024)
    return out


def fresh_times(models_dir: Path, model: str) -> tuple[float, float]:
    """(prefill of one 80-token prompt, one decode step of 2 requests at ~70 tokens), each the
    fastest of five, on a new engine."""
    from aegaeon.gpu_worker.engine import Engine, EngineConfig

    engine = Engine(EngineConfig(device="cpu", arena_bytes=512 << 20))
    try:
        engine.register_model(model, models_dir / model)
        profiler = Profiler(engine)
        profiler.warm_up(model)
        prefill = min(profiler.prefill(model, [80]) for _ in range(5))
        decode = min(profiler.decode(model, [68, 68], 3)[1] for _ in range(5))
        return prefill, decode
    finally:
        engine.close()


def test_profile_command_writes_a_profile_that_predicts_a_fresh_measurement(demo_models_dir, tmp_path):  # fmt: skip
    out = tmp_path / "cpu.json"
    code = cli.main(["profile", "--models-dir", str(demo_models_dir), "--models", ",".join(MODELS),
                     "--quick", "--out", str(out)])  # fmt: skip
    assert code == 0
    data = json.loads(out.read_text())
    assert set(data["models"]) == set(MODELS)
    assert set(data["fit"]["demo-llama"]) >= {"prefill", "decode", "switch"}

    estimator = load_estimator(str(out), specs(demo_models_dir, [*MODELS, "demo-mistral"]))
    # The file's fitted numbers, not the roofline default (which only fills in demo-mistral).
    assert list(estimator.profiles["demo-llama"].prefill) == data["models"]["demo-llama"]["prefill"]
    assert estimator.profiles["demo-mistral"].weight_bytes > 0
    for model in MODELS:
        prefill, decode = fresh_times(demo_models_dir, model)
        predicted_prefill = estimator.prefill_time(model, [80])
        predicted_decode = estimator.decode_time(model, [70, 70])
        assert predicted_prefill > 0 and predicted_decode > 0
        assert estimator.switch_time(model) > 0
        # A shared 2-core CPU under load is noisy (both sides keep their fastest sample); a wrong
        # unit or a fit that lost its scale is off by far more than 8×.
        assert prefill / 8 < predicted_prefill < prefill * 8, (model, prefill, predicted_prefill)
        assert decode / 8 < predicted_decode < decode * 8, (model, decode, predicted_decode)


def test_profile_switch_time_is_the_measured_bulk_copy(demo_models_dir):
    estimator, quality = profile_models(demo_models_dir, MODELS, "cpu", TINY, 512 << 20, progress=False)  # fmt: skip
    for model in MODELS:
        measured = quality[model]["switch_measured_s"]
        assert measured > 0
        assert measured / 5 < estimator.switch_time(model) < measured * 5
    # Bigger weights take longer to copy in.
    assert estimator.switch_time("demo-qwen2") > estimator.switch_time("demo-llama")
    assert estimator.device == "cpu"


def test_profile_keeps_models_measured_earlier_on_the_same_device(tmp_path):
    path = tmp_path / "cpu.json"
    old = Estimator({"old-model": _profile(1.0)}, "cpu")
    path.write_text(json.dumps({**old.to_json(), "fit": {"old-model": {"r2": 1.0}}}))
    new = Estimator({"new-model": _profile(2.0)}, "cpu")
    data = merged_json(new, {"new-model": {"r2": 0.9}}, path)
    assert set(data["models"]) == {"old-model", "new-model"}
    assert set(data["fit"]) == {"old-model", "new-model"}
    other_device = merged_json(Estimator({"new-model": _profile(2.0)}, "cuda"), {}, path)
    assert set(other_device["models"]) == {"new-model"}


def test_fit_quality_is_perfect_for_exact_predictions_and_counts_relative_error():
    assert fit_quality([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == {"r2": 1.0, "rel_err": 0.0, "samples": 3}  # fmt: skip
    q = fit_quality([1.1, 2.2], [1.0, 2.0])
    assert q["rel_err"] == pytest.approx(0.1)
    assert q["r2"] < 1.0


def test_switch_fit_with_one_model_size_puts_all_time_on_the_bytes():
    fixed, bandwidth = fit_switches([(1000, 0.002), (1000, 0.001), (1000, 0.003), (0, 0.0)])
    assert fixed == 0.0
    assert bandwidth == pytest.approx(1000 / 0.002)
    fixed, bandwidth = fit_switches([(1000, 0.011), (3000, 0.031)])
    assert fixed == pytest.approx(0.001)
    assert bandwidth == pytest.approx(1e5)


def _up_args(device: str = "cpu", profile: Path | None = None) -> argparse.Namespace:
    return argparse.Namespace(policy="aegaeon", profile=profile, device=device, workers=1,
                              arena_bytes=None, host="127.0.0.1", port=8000)  # fmt: skip


def _scheduler_argv(args: argparse.Namespace, home: Path) -> list[str]:
    children = plan_children(
        args, home / "models", home / "logs", 1 << 20, profile_path(args, home)
    )
    return next(c for c in children if c.name == "scheduler").argv


def test_up_passes_the_profile_in_home_to_the_scheduler(tmp_path):
    assert "--profile" not in _scheduler_argv(_up_args(), tmp_path)
    (tmp_path / "profiles").mkdir()
    found = tmp_path / "profiles" / "cpu.json"
    found.write_text("{}")
    argv = _scheduler_argv(_up_args(), tmp_path)
    assert argv[argv.index("--profile") + 1] == str(found)
    assert "--profile" not in _scheduler_argv(_up_args(device="cuda"), tmp_path)


def test_up_profile_option_wins_over_the_one_in_home(tmp_path):
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "cpu.json").write_text("{}")
    chosen = tmp_path / "mine.json"
    chosen.write_text("{}")
    argv = _scheduler_argv(_up_args(profile=chosen), tmp_path)
    assert argv[argv.index("--profile") + 1] == str(chosen.resolve())
    with pytest.raises(SystemExit):
        profile_path(_up_args(profile=tmp_path / "missing.json"), tmp_path)


def _profile(scale: float) -> ModelProfile:
    return ModelProfile((scale, 0.0, 0.0), (scale, 0.0, 0.0), 0.0, 1e9, 1000, 10)


def test_a_switch_fit_swamped_by_noise_still_grows_with_the_weights():
    from aegaeon.scheduler.profile import fit_switches

    # Bigger copies that happened to time shorter: the least-squares slope is negative.
    fixed, bandwidth = fit_switches([(10 << 20, 0.004), (20 << 20, 0.003), (15 << 20, 0.0035)])
    assert fixed == 0.0 and 0 < bandwidth < float("inf")
    assert fixed + (20 << 20) / bandwidth > fixed + (10 << 20) / bandwidth
