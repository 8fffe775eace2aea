"""Fixtures for engine tests: engines on small arenas and transformers' reference outputs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from aegaeon.gpu_worker.engine import Engine, EngineConfig
from engine_helpers import MODELS, NEW_TOKENS, PROMPTS

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread() -> Iterator[None]:
    """Small models gain nothing from a second thread on a shared 2-core runner, and lose a lot
    when the other core is busy (OpenMP threads spin-wait); restored after this folder's tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    """Every engine test runs on the CPU, and on CUDA when there is one (in fp32 there too)."""
    return str(request.param)


@pytest.fixture
def make_engine(
    demo_models_dir: Path, device: str, tmp_path: Path
) -> Iterator[Callable[..., Engine]]:
    """Build engines with all demo models registered (from ``models``: another copy of them,
    e.g. saved in bf16; ``None``: none registered, as a worker's engine starts); closes them at
    the end."""
    engines: list[Engine] = []

    def build(models: Path | None = demo_models_dir, **overrides: object) -> Engine:
        options: dict = {"device": device, "dtype": "float32", "arena_bytes": 640 << 20,
                         "host_kv_bytes": 64 << 20, "host_kv_dir": str(tmp_path)}  # fmt: skip
        options.update(overrides)
        engine = Engine(EngineConfig(**options))
        for name in MODELS if models is not None else ():
            engine.register_model(name, models / name)
        engines.append(engine)
        return engine

    yield build
    for engine in engines:
        engine.close()


@pytest.fixture(scope="session")
def references(
    demo_models_dir: Path,
) -> Callable[[str, str], tuple[list[list[int]], list[torch.Tensor]]]:
    """transformers' greedy tokens and per-step log-softmax rows for (model, device), cached."""
    cache: dict[tuple[str, str], tuple[list[list[int]], list[torch.Tensor]]] = {}

    def get(model: str, device: str) -> tuple[list[list[int]], list[torch.Tensor]]:
        if (model, device) not in cache:
            cache[(model, device)] = _reference(demo_models_dir / model, device)
        return cache[(model, device)]

    return get


def _reference(folder: Path, device: str) -> tuple[list[list[int]], list[torch.Tensor]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    tokens, logprobs = [], []
    for prompt in PROMPTS:
        out = model.generate(
            torch.tensor([prompt], device=device), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
            do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0,
        )  # fmt: skip
        tokens.append(out.sequences[0, len(prompt) :].tolist())
        logprobs.append(
            torch.stack([torch.log_softmax(s[0].float(), -1) for s in out.logits]).cpu()
        )
    return tokens, logprobs
