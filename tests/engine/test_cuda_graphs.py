"""Decode through CUDA graphs (runners/cuda_graphs.py): padded batches and positions give
transformers' tokens, and a model switched into the same slot with the same layout reuses the
graphs captured for the model before it — reading the new model's weights.

On CUDA these run the real graphs. On the CPU, where there are none, the same padding and keys
run through ``EagerPadded``: each "graph" is the decode step run eagerly on the padded inputs.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from aegaeon.gpu_worker.engine import Engine
from aegaeon.gpu_worker.paged_kv import PagedKV, StepInputs
from aegaeon.gpu_worker.runners.cuda_graphs import DecodeGraphs, _Graph
from engine_helpers import GREEDY, NEW_TOKENS, PROMPTS, run_all
from safetensors.torch import load_file, save_file


class _EagerGraph:
    """Stands in for a captured graph on the CPU: a replay runs the step on the captured input
    tensors and writes the captured output tensor, as a graph replay does."""

    def __init__(self, runner: Any, inputs: StepInputs, kv: PagedKV) -> None:
        self.runner, self.inputs, self.kv = runner, inputs, kv
        self.logits = runner.decode_step(inputs, kv)

    def replay(self) -> None:
        with torch.inference_mode():  # a graph replay records nothing for autograd either
            self.logits.copy_(self.runner.decode_step(self.inputs, self.kv))


class EagerPadded(DecodeGraphs):
    """The graphs' padding, keys and bookkeeping, each graph an ``_EagerGraph``."""

    def __init__(self, engine: Engine, fail_captures: int = 0) -> None:
        super().__init__(engine.device, engine.arena.holds, False, engine.slots.copy_thread_busy)
        self.enabled = True
        self.fail_captures = fail_captures

    def _capture(self, key: tuple[Any, ...], runner: Any, kv: PagedKV, host: StepInputs, keep: list[torch.Tensor]) -> Any:  # fmt: skip
        if self.fail_captures:
            self.fail_captures -= 1
            raise RuntimeError("CUDA error: capturing stream has unjoined work")
        graph = _EagerGraph(runner, host.to(self.device), kv)
        self.captures += 1
        self._graphs[key] = _Graph(graph, graph.inputs, graph.logits, (keep, kv))  # type: ignore[arg-type]
        return self._graphs[key]


def _graphed(engine: Engine, fail_captures: int = 0) -> Engine:
    if engine.device.type != "cuda" or fail_captures:
        engine.graphs = EagerPadded(engine, fail_captures)
    assert engine.graphs.enabled
    return engine


def _greedy(folder: Path, prompts: list[list[int]], device: str) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    out = []
    for prompt in prompts:
        ids = model.generate(torch.tensor([prompt], device=device), max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)  # fmt: skip
        out.append(ids[0, len(prompt) :].tolist())
    return out


def _twins(source: Path, out: Path) -> tuple[Path, Path]:
    """Two copies of a model with the same file layout and different weights."""
    tensors = load_file(source / "model.safetensors")
    folders = []
    for name, scale in (("twin-a", 1.0), ("twin-b", 1.5)):
        folder = out / name
        shutil.copytree(source, folder)
        scaled = {k: (v * scale if v.dim() == 2 else v).contiguous() for k, v in tensors.items()}
        save_file(scaled, folder / "model.safetensors", metadata={"format": "pt"})
        folders.append(folder)
    return folders[0], folders[1]


def _serve(engine: Engine, model: str, prompts: list[list[int]]) -> list[list[int]]:
    engine.switch_to(model)
    ids = [f"{model}/{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts, strict=True):
        engine.add_request(rid, model, prompt, GREEDY)
    got = run_all(engine, ids)
    return [[o.token_id for o in got[rid]] for rid in ids]


def test_padded_batch_and_positions_give_transformers_tokens(make_engine, demo_models_dir, device):  # fmt: skip
    engine = _graphed(make_engine())
    prompts = PROMPTS[:3]  # a batch of 3 runs padded to 4; every length inside one 64-token bucket
    for model in ("demo-llama", "demo-qwen2"):
        got = _serve(engine, model, prompts)
        assert got == _greedy(demo_models_dir / model, prompts, device)
    assert engine.graphs.captures >= 2


@pytest.mark.parametrize("slots", [1, 2])
def test_a_same_layout_model_reuses_the_slots_graphs(make_engine, demo_models_dir, device, tmp_path, slots):  # fmt: skip
    twin_a, twin_b = _twins(demo_models_dir / "demo-llama", tmp_path)
    engine = _graphed(make_engine(weight_slots=slots))
    engine.register_model("twin-a", twin_a)
    engine.register_model("twin-b", twin_b)
    prompts = PROMPTS[:2]
    assert _serve(engine, "twin-a", prompts) == _greedy(twin_a, prompts, device)
    captured = engine.graphs.captures
    assert captured >= 1
    assert _serve(engine, "twin-b", prompts) == _greedy(twin_b, prompts, device)
    if slots == 1:  # same slot, same layout: the graphs read the slot, now twin-b's weights
        assert engine.graphs.captures == captured
    else:  # twin-b sits in the other slot: other addresses, its own graphs
        assert engine.graphs.captures > captured


def test_a_failed_capture_decodes_without_a_graph(make_engine, demo_models_dir, device):
    engine = _graphed(make_engine(), fail_captures=1)
    prompts = PROMPTS[:3]
    assert _serve(engine, "demo-llama", prompts) == _greedy(demo_models_dir / "demo-llama", prompts, device)  # fmt: skip
    assert engine.graphs.captures == 0 and len(engine.graphs._failed) == 1


def test_no_capture_while_the_copy_thread_works(make_engine, demo_models_dir, device):
    engine = _graphed(make_engine())
    busy = []
    engine.graphs._busy = lambda: busy.append(True) or True  # a prefetch forever being queued
    prompts = PROMPTS[:2]
    assert _serve(engine, "demo-llama", prompts) == _greedy(demo_models_dir / "demo-llama", prompts, device)  # fmt: skip
    assert busy and engine.graphs.captures == 0
    engine.graphs._busy = lambda: False  # the copy thread done: the next decode captures
    assert _serve(engine, "demo-llama", prompts[:1]) == _greedy(demo_models_dir / "demo-llama", prompts[:1], device)  # fmt: skip
    assert engine.graphs.captures == 1


def test_replay_times_each_graph_and_leaves_later_requests_exact(make_engine, demo_models_dir, device):  # fmt: skip
    engine = _graphed(make_engine())
    prompts = PROMPTS[:3]
    expected = _greedy(demo_models_dir / "demo-llama", prompts, device)
    assert _serve(engine, "demo-llama", prompts) == expected
    times = engine.graphs.replay_seconds(repeats=3)
    assert set(times) == {(4, 64)} and all(t > 0 for t in times.values())
    assert _serve(engine, "demo-llama", prompts) == expected
