"""Shared constants and helpers of the engine tests."""

from __future__ import annotations

from aegaeon.gpu_worker.engine import Engine

from aegaeon.protocol import SamplingParams

MODELS = ["demo-llama", "demo-qwen2", "demo-mistral", "demo-gpt2"]
NATIVE = MODELS[:3]
PROMPTS = [[5, 17, 300, 42, 9, 11, 250, 3], [100, 200, 300], list(range(40, 77)), [7] * 21]
NEW_TOKENS = 12
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, logprobs=3)


def run_all(engine: Engine, ids: list[str]) -> dict[str, list]:
    """Step the given requests (all of the resident model) to completion; outputs per request."""
    got: dict[str, list] = {rid: [] for rid in ids}
    while live := [rid for rid in ids if rid in engine.request_ids()]:
        for out in engine.step(live):
            got[out.request_id].append(out)
    return got
