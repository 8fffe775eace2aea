"""The models ``bench serve`` replays against: several small Llama-family demo models, and the
device budget that holds at most half of their weights at once (more models than memory).

The stock demo set cannot meet that condition (demo-mistral alone is 60% of its bytes, and a
worker slot must hold the largest model), so the benchmark writes its own set: variants of the
small demo shapes with their own seeds, i.e. distinct weights, through the demo-model factory.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from aegaeon.scheduler.policies.base import ModelSpec

MiB = 1 << 20
WEIGHT_SLOTS = 2  # a worker holds the resident model and one prefetched model (DESIGN.md §5)
SLOT_SLACK_BYTES = 1 * MiB  # alignment and per-tensor padding inside a slot


def bench_specs(count: int) -> list:
    """``count`` small Llama-family demo specs (llama / qwen2 / mistral shapes, distinct seeds)."""
    from aegaeon.model_store.demo import DemoSpec

    shapes = [
        DemoSpec("bench-llama", "llama", 256, 4, 8, 4, 704, seed=1),
        DemoSpec("bench-qwen2", "qwen2", 256, 4, 8, 2, 768, tied=True, seed=2),
        DemoSpec("bench-mistral", "mistral", 256, 4, 8, 2, 704, seed=3),
    ]
    specs = []
    for i in range(count):
        base = shapes[i % len(shapes)]
        name = base.name if i < len(shapes) else f"{base.name}-{i // len(shapes) + 1}"
        specs.append(replace(base, name=name, seed=base.seed + 100 * (i // len(shapes))))
    return specs


def write_bench_models(out_dir: Path, count: int) -> list[str]:
    """Write (or keep, when already complete) the benchmark's models; returns their names."""
    from aegaeon.model_store import demo

    out_dir.mkdir(parents=True, exist_ok=True)
    specs = bench_specs(count)
    todo = [s for s in specs if not (out_dir / s.name / "model.safetensors").is_file()]
    if todo:
        tokenizer = demo.train_tokenizer()
        for spec in todo:
            demo._write_model(spec, out_dir, tokenizer, None)
    return [s.name for s in specs]


def model_specs(models_dir: Path, names: list[str]) -> dict[str, ModelSpec]:
    """The policy's view of each model, from the model-store's own description of the folder."""
    from aegaeon.model_store.registry import describe

    specs = {}
    for name in names:
        info = describe(models_dir / name, name)
        specs[name] = ModelSpec(
            info.name, info.weight_bytes, info.kv_bytes_per_token, info.context_length
        )
    return specs


def device_budget(weight_bytes: list[int]) -> tuple[int, int]:
    """(arena bytes, weight budget bytes) of a worker whose slots each just fit the largest model.

    The worker's weight budget is half its arena (the other half holds KV), split into
    ``WEIGHT_SLOTS`` slots.
    """
    slot = -(-(max(weight_bytes) + SLOT_SLACK_BYTES) // MiB) * MiB
    weights = slot * WEIGHT_SLOTS
    return 2 * weights, weights


def budget_fraction(weight_budget: int, weight_bytes: list[int]) -> float:
    """Share of all the models' weights that the device holds at once (≤ 0.5 is the goal)."""
    return weight_budget / sum(weight_bytes)
