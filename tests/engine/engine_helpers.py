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


def decode_swapping(engine: Engine, model: str, prompt: list[int], at: tuple[int, ...] = (3, 7)) -> list:  # fmt: skip
    """One request alone; its KV swapped out (and the device KV overwritten with NaN, so it must
    come back from the host copy) before each step in ``at``; its outputs."""
    engine.switch_to(model)
    engine.add_request("r", model, prompt, GREEDY)
    outs = []
    for step in range(NEW_TOKENS):
        if step in at:
            engine.swap_out(["r"])
            engine.arena.kv.fill_(float("nan"))
        outs += engine.step(["r"])
    return outs
