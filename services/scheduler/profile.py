"""``aegaeon profile``: measure the real engine, fit the scheduler's step-time and switch models.

For each model, on one in-process :class:`~aegaeon.gpu_worker.engine.Engine`::

    prefill  a grid of batches (prompt lengths)          → fit a + b·Σl + c·Σl²
    decode   a grid of (batch size, context length)      → fit a + b·Σl + c·batch
    switch   bulk weight copies (slots invalidated first) → fit fixed + bytes / bandwidth

and write the :class:`~aegaeon.scheduler.estimators.Estimator` JSON that ``aegaeon serve
scheduler --profile`` (and ``aegaeon up``, which looks in ``<home>/profiles/<device>.json``) loads.
The file also keeps each fit's R² and mean relative error under ``"fit"``, which the loader ignores.
Profiles of models not measured this time are kept when the file already exists (same device).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aegaeon.scheduler.estimators import (
    Coeffs,
    Estimator,
    ModelProfile,
    fit_decode,
    fit_prefill,
    fit_switch,
)

from aegaeon.config import default_state_dir
from aegaeon.protocol import SamplingParams

Samples = list[tuple[list[int], float]]


@dataclass(frozen=True)
class Grid:
    """What to measure: prefill batches, decode (batch size × context length), repetitions."""

    prefill_batches: tuple[tuple[int, ...], ...]
    decode_batch_sizes: tuple[int, ...]
    decode_contexts: tuple[int, ...]
    decode_steps: int  # decode steps timed per (batch size, context) point
    repeats: int  # prefill repetitions per batch (the median is kept)
    switch_rounds: int  # times each model's weights are copied in


QUICK = Grid(((16,), (64,), (160,), (32, 32), (64, 64, 64)), (1, 4), (32, 192), 3, 5, 2)
FULL = Grid(
    ((16,), (64,), (128,), (256,), (512,), (32, 32), (64, 64, 64), (128,) * 4, (16,) * 8, (256, 64)),
    (1, 2, 4, 8), (32, 128, 512), 4, 5, 4,
)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models-dir", type=Path, default=None,
                        help="models in HF layout (default: <home>/models)")  # fmt: skip
    parser.add_argument("--models", default=None, help="comma-separated names (default: all)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--out", type=Path, default=None,
                        help="profile JSON (default: <home>/profiles/<device>.json)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="a small grid (< 1 min on a CPU)")
    parser.add_argument("--arena-bytes", type=int, default=None, help="the engine's arena")
    parser.add_argument("--home", type=Path, default=None, help="state dir (default $AEGAEON_HOME)")


def device_kind(device: str) -> str:
    """``cuda:1`` → ``cuda``: profiles are stored per kind of device, as ``aegaeon up`` names it."""
    return device.split(":", 1)[0]


def default_profile_path(home: Path | None, device: str) -> Path:
    """``<home>/profiles/<cpu|cuda>.json``, where ``aegaeon up`` looks for it."""
    return (home or default_state_dir()).expanduser() / "profiles" / f"{device_kind(device)}.json"


# ------------------------------------------------------------------ measuring one engine


class Profiler:
    """Times real engine calls on one engine; every public method returns raw samples."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self._serial = 0

    def _add(self, model: str, lens: Sequence[int], max_tokens: int) -> list[str]:
        vocab = self.engine.specs[model].hf_config.vocab_size
        sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        ids = []
        for n in lens:
            self._serial += 1
            rid = f"profile-{self._serial}"
            # Ordinary token ids (not 0..2, the demo tokenizers' special tokens), varied per request.
            prompt = [3 + (7 * j + 13 * self._serial) % (vocab - 3) for j in range(n)]
            self.engine.add_request(rid, model, prompt, sampling)
            ids.append(rid)
        return ids

    def _drop(self, ids: list[str]) -> None:
        for rid in ids:
            self.engine.abort(rid)

    def warm_up(self, model: str) -> None:
        """One prefill and a few decode steps: first calls pay for lazy initialisation."""
        self.engine.switch_to(model)
        ids = self._add(model, [24, 24], 4)
        for _ in range(3):
            self.engine.step(ids)
        self._drop(ids)

    def prefill(self, model: str, lens: Sequence[int], repeats: int = 1) -> float:
        """Median seconds of one prefill step over a batch of prompts of ``lens`` tokens."""
        times = []
        for _ in range(repeats):
            ids = self._add(model, lens, 2)
            t0 = time.perf_counter()
            self.engine.step(ids)
            times.append(time.perf_counter() - t0)
            self._drop(ids)
        return statistics.median(times)

    def decode(self, model: str, lens: Sequence[int], steps: int) -> tuple[list[int], float]:
        """Fastest of ``steps`` decode steps after prefilling ``lens``, with the context lengths
        of the middle step (one sample per grid point: a step slowed by another process on a
        shared CPU must not pull the least-squares fit)."""
        ids = self._add(model, lens, steps + 2)
        self.engine.step(ids)  # the prefill, not timed here
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            self.engine.step(ids)
            times.append(time.perf_counter() - t0)
        self._drop(ids)
        # A step attends over prompt + outputs so far (what RequestView.context_len says).
        middle = 1 + (steps - 1) // 2
        return [n + middle for n in lens], min(times)

    def switch(self, model: str) -> tuple[int, float]:
        """(bytes, seconds) of a real bulk copy: the slots are forgotten first, so nothing is
        already resident or prefetched."""
        self.engine.invalidate_weights()
        stats = self.engine.switch_to(model)
        return int(stats.bytes), float(stats.seconds)


# ------------------------------------------------------------------ fit quality (pure)


def fit_quality(predicted: Sequence[float], measured: Sequence[float]) -> dict[str, float]:
    """R² and mean relative error of a fit on its own samples."""
    mean = statistics.fmean(measured)
    ss_tot = sum((m - mean) ** 2 for m in measured)
    ss_res = sum((p - m) ** 2 for p, m in zip(predicted, measured, strict=True))
    rel = [abs(p - m) / m for p, m in zip(predicted, measured, strict=True) if m > 0]
    return {
        "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0,
        "rel_err": statistics.fmean(rel) if rel else 0.0,
        "samples": len(measured),
    }


def prefill_quality(coeffs: Coeffs, samples: Samples) -> dict[str, float]:
    a, b, c = coeffs
    predicted = [a + b * sum(lens) + c * sum(n * n for n in lens) for lens, _ in samples]
    return fit_quality(predicted, [s for _, s in samples])


def decode_quality(coeffs: Coeffs, samples: Samples) -> dict[str, float]:
    a, b, c = coeffs
    predicted = [a + b * sum(lens) + c * len(lens) for lens, _ in samples]
    return fit_quality(predicted, [s for _, s in samples])


def fit_switches(samples: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """(fixed seconds, bytes/s). With one model size the fixed part is not identifiable, and
    when timing noise swamps the size differences (millisecond copies on a busy machine) the
    fit can come out with a negative fixed part or a non-positive slope: then the fixed part
    is taken as 0 and all of the time is put on the bytes (the conservative reading), so a
    bigger model never predicts a shorter switch."""
    copied = [(b, s) for b, s in samples if b > 0]
    if not copied:
        return 0.0, float("inf")
    if len({b for b, _ in copied}) >= 2:
        fixed, bandwidth = fit_switch(copied)
        if fixed >= 0 and 0 < bandwidth < float("inf"):
            return fixed, bandwidth
    return 0.0, statistics.median(b / s for b, s in copied if s > 0)


def switch_quality(fixed: float, bandwidth: float, samples: Sequence[tuple[int, float]]) -> dict[str, float]:  # fmt: skip
    copied = [(b, s) for b, s in samples if b > 0]
    return fit_quality([fixed + b / bandwidth for b, _ in copied], [s for _, s in copied])


# ------------------------------------------------------------------ the whole run


@dataclass
class ModelMeasurement:
    """Everything measured for one model."""

    prefill: Samples
    decode: Samples
    switches: list[tuple[int, float]]


def plan_steps(models: Sequence[str], grid: Grid) -> int:
    """Progress-bar units: one per pass over a model's grid and one per switch."""
    return len(models) * (grid.repeats + grid.switch_rounds)


def measure(profiler: Profiler, models: Sequence[str], grid: Grid, tick: Any) -> Iterator[tuple[str, ModelMeasurement]]:  # fmt: skip
    """Measure each model in turn. Switch samples interleave models, so every copy is cold.
    The grid is walked ``repeats`` times and each point keeps its fastest pass: contention from
    other processes only ever adds time, so the minimum is the engine's own cost (as timeit
    reasons), and a burst of it spoils one pass, not every sample of one point."""
    switches: dict[str, list[tuple[int, float]]] = {m: [] for m in models}
    for _ in range(grid.switch_rounds):
        for model in models:
            switches[model].append(profiler.switch(model))
            tick()
    for model in models:
        profiler.warm_up(model)
        prefill: list[list[float]] = [[] for _ in grid.prefill_batches]
        decode: dict[tuple[int, int], list[tuple[list[int], float]]] = {}
        for _ in range(grid.repeats):
            for i, lens in enumerate(grid.prefill_batches):
                prefill[i].append(profiler.prefill(model, lens, 1))
            for size in grid.decode_batch_sizes:
                for context in grid.decode_contexts:
                    sample = profiler.decode(model, [context] * size, grid.decode_steps)
                    decode.setdefault((size, context), []).append(sample)
            tick()
        yield model, ModelMeasurement(
            [(list(lens), min(t)) for lens, t in zip(grid.prefill_batches, prefill, strict=True)],
            [(runs[0][0], min(s for _, s in runs)) for runs in decode.values()],
            switches[model],
        )  # fmt: skip


def fit_model(m: ModelMeasurement, weight_bytes: int, kv_bytes_per_token: int, all_switches: list[tuple[int, float]]) -> tuple[ModelProfile, dict[str, Any]]:  # fmt: skip
    """Fit one model's profile; the switch fit pools every model's copies (one link)."""
    prefill, decode = fit_prefill(m.prefill), fit_decode(m.decode)
    fixed, bandwidth = fit_switches(all_switches)
    profile = ModelProfile(prefill, decode, fixed, bandwidth, weight_bytes, kv_bytes_per_token)
    quality = {
        "prefill": prefill_quality(prefill, m.prefill),
        "decode": decode_quality(decode, m.decode),
        "switch": switch_quality(fixed, bandwidth, all_switches),  # one fit for the link
        "switch_measured_s": min(s for _, s in m.switches) if m.switches else 0.0,
    }
    return profile, quality


def kv_bytes_per_token(spec: Any, element_size: int) -> int:
    """K and V of every layer for one token: 2 · layers · kv_heads · head_dim · dtype bytes."""
    shape = spec.kv_shape
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * element_size


def profile_models(models_dir: Path, names: Sequence[str], device: str, grid: Grid, arena_bytes: int | None = None, progress: bool = True) -> tuple[Estimator, dict[str, Any]]:  # fmt: skip
    """Measure and fit every model on a fresh engine: (estimator, fit quality per model)."""
    from aegaeon.gpu_worker.engine import Engine, EngineConfig
    from tqdm import tqdm

    engine = Engine(EngineConfig(device=device, arena_bytes=arena_bytes))
    try:
        for name in names:
            engine.register_model(name, models_dir / name)
        bar = tqdm(total=plan_steps(names, grid), desc="profiling", unit="pt", disable=not progress)  # fmt: skip
        measured = dict(measure(Profiler(engine), names, grid, bar.update))
        bar.close()
        # Each model's fastest copy, as for the step times: the link's cost, not the neighbours'.
        all_switches = [
            min(m.switches, key=lambda s: s[1]) for m in measured.values() if m.switches
        ]
        profiles, quality = {}, {}
        for name, m in measured.items():
            spec = engine.specs[name]
            kv = kv_bytes_per_token(spec, engine.esize)
            profiles[name], quality[name] = fit_model(m, spec.weight_bytes, kv, all_switches)
        return Estimator(profiles, device_kind(device)), quality
    finally:
        engine.close()


def merged_json(estimator: Estimator, quality: dict[str, Any], path: Path) -> dict[str, Any]:
    """The file's new content: earlier profiles of the same device kept, this run's replacing."""
    old: dict[str, Any] = {}
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = {}
    if old.get("device") != estimator.device:
        old = {}
    data = estimator.to_json()
    data["models"] = {**old.get("models", {}), **data["models"]}
    data["fit"] = {**old.get("fit", {}), **quality}
    data["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return data


def print_table(estimator: Estimator, quality: dict[str, Any]) -> None:
    """Fitted coefficients and fit quality, one row per model."""
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"aegaeon profile ({estimator.device}); R² and mean relative error of each fit"
    )
    for column in ("model", "prefill a \\[s] / b \\[s/tok] / c \\[s/tok²]", "R² · err",
                   "decode a \\[s] / b \\[s/ctx tok] / c \\[s/req]", "R² · err", "switch s", "link GB/s"):  # fmt: skip
        table.add_column(column, no_wrap=True)
    for name, p in estimator.profiles.items():
        q = quality[name]
        table.add_row(
            name, _coeffs(p.prefill), _quality(q["prefill"]), _coeffs(p.decode),
            _quality(q["decode"]), f"{estimator.switch_time(name):.4f}",
            f"{p.link_bytes_per_s / 1e9:.2f}",
        )  # fmt: skip
    Console(width=max(160, Console().width)).print(table)


def _coeffs(c: Coeffs) -> str:
    return " / ".join(f"{x:.3g}" for x in c)


def _quality(q: dict[str, float]) -> str:
    return f"{q['r2']:.3f} · {100 * q['rel_err']:.1f}%"


def model_names(models_dir: Path, wanted: str | None) -> list[str]:
    """Names to profile: ``--models`` in its order, else every model folder, sorted."""
    available = sorted(p.parent.name for p in models_dir.glob("*/config.json"))
    if not wanted:
        return available
    names = [n.strip() for n in wanted.split(",") if n.strip()]
    missing = [n for n in names if n not in available]
    if missing:
        raise SystemExit(f"aegaeon profile: no such model in {models_dir}: {', '.join(missing)}")
    return names


def main(args: argparse.Namespace) -> int:
    """Profile, print the table, write the JSON."""
    home = (args.home or default_state_dir()).expanduser()
    models_dir = (args.models_dir or home / "models").expanduser()
    if not models_dir.is_dir():
        raise SystemExit(f"aegaeon profile: {models_dir} is not a folder (see --models-dir)")
    names = model_names(models_dir, args.models)
    if not names:
        raise SystemExit(f"aegaeon profile: no models in {models_dir}")
    grid = QUICK if args.quick else FULL
    estimator, quality = profile_models(models_dir, names, args.device, grid, args.arena_bytes)
    out = args.out or default_profile_path(home, args.device)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(merged_json(estimator, quality, out), indent=2))
    print_table(estimator, quality)
    print(f"profile written to {out}")
    return 0
