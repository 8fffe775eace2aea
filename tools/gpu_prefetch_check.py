"""GPU check of live prefetch and the KV hand-off (issue 8), run by ``tools/gpu_check.sh``.

On one device, with the 7B-shaped bf16 demo model registered under two names (two models of the
same shape, each switch a full 13.5 GB copy):

1. decode steps at batch 8 with no copy in flight (the reference step time);
2. the same steps while the other model's weights are prefetched into the free slot on the copy
   stream (does the copy overlap compute, and what does it cost the steps?);
3. the switch after that: how long it waited and how many bytes were copied in the background;
4. a foreground switch (nothing prefetched) for comparison;
5. KV hand-off between two engines on the device through the host pool: export, import, and the
   first decoded token equal to the uninterrupted run.

Prints one JSON object (also written to ``--json``).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch
from aegaeon.gpu_worker.engine import Engine, EngineConfig
from aegaeon.gpu_worker.weights_loader import load_spec

from aegaeon.protocol import SamplingParams

BATCH = 8
PROMPT = 64
GREEDY = SamplingParams(max_tokens=512, temperature=0.0, ignore_eos=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(engine: Engine, ids: list[str], steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        sync(engine.device)
        start = time.perf_counter()
        engine.step(ids)
        sync(engine.device)
        times.append(time.perf_counter() - start)
    return times


def prompts(n: int) -> list[list[int]]:
    return [[(13 * i + j) % 1000 + 3 for j in range(PROMPT)] for i in range(n)]


def prefetch_overlap(engine: Engine, a: str, b: str, c: str) -> dict[str, float]:
    ids = [f"p{i}" for i in range(BATCH)]
    engine.switch_to(a)
    for rid, prompt in zip(ids, prompts(BATCH), strict=True):
        engine.add_request(rid, a, prompt, GREEDY)
    engine.step(ids)  # prefill
    timed_steps(engine, ids, 5)  # warm-up
    plain = timed_steps(engine, ids, 40)

    start = time.perf_counter()
    engine.start_prefetch(b)
    issue_s = time.perf_counter() - start
    racing = timed_steps(engine, ids, 40)
    switch = engine.switch_to(b)
    # A third name, never prefetched: a foreground copy of the same bytes.
    foreground = engine.switch_to(c)
    for rid in ids:
        engine.abort(rid)
    total = switch.bytes + switch.prefetched_bytes
    return {
        "prefetch_issue_s": issue_s,
        "decode_step_s_plain": statistics.median(plain),
        "decode_step_s_while_prefetching": statistics.median(racing),
        "decode_time_while_prefetching_s": sum(racing),
        "switch_wait_s_after_prefetch": switch.seconds,
        "switch_bytes_waited": switch.bytes,
        "switch_bytes_prefetched": switch.prefetched_bytes,
        "prefetch_hidden_fraction": switch.prefetched_bytes / total if total else 0.0,
        "switch_wait_s_foreground": foreground.seconds,
        "foreground_bytes": foreground.bytes,
        "foreground_gb_s": foreground.bytes / foreground.seconds / 1e9
        if foreground.seconds
        else 0.0,
    }


def kv_handoff(
    model_dir: Path, model: str, weights: int, kv: int, device: str
) -> dict[str, float | bool]:
    """Prefill on one engine, hand the KV to another through the host pool, decode there."""
    slot = (weights * 11 // 10 + 4095) // 4096 * 4096
    config = EngineConfig(device=device, arena_bytes=slot + kv, weight_budget_bytes=slot,
                          weight_slots=1)  # fmt: skip
    reference, prefill, decode = Engine(config), Engine(config), None
    try:
        prompt = prompts(1)[0]
        sampling = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        reference.register_model(model, model_dir)
        reference.switch_to(model)
        reference.add_request("r", model, prompt, sampling)
        expected = [reference.step(["r"])[0].token_id for _ in range(8)]
        reference.close()

        prefill.register_model(model, model_dir)
        prefill.switch_to(model)
        prefill.add_request("r", model, prompt, sampling)
        first = prefill.step(["r"])[0].token_id
        sync(prefill.device)
        start = time.perf_counter()
        handle = prefill.export_kv("r")
        export_s = time.perf_counter() - start
        decode = Engine(config)
        decode.register_model(model, model_dir)
        decode.switch_to(model)
        start = time.perf_counter()
        decode.import_kv("r", model, prompt, sampling, [first], handle)
        import_s = time.perf_counter() - start
        rest = [decode.step(["r"])[0].token_id for _ in range(7)]
        return {
            "handoff_export_s": export_s,
            "handoff_import_s": import_s,
            "handoff_bytes": handle.nbytes,
            "handoff_tokens_exact": [first, *rest] == expected,
        }
    finally:
        prefill.close()
        if decode is not None:
            decode.close()


def prefetch_part(model_dir: Path, model: str, device: str) -> dict[str, object]:
    """The model under three names on one engine of two slots, then ``prefetch_overlap``."""
    engine = Engine(EngineConfig(device=device))
    try:
        names = [model, model + "#2", model + "#3"]
        for name in names:
            engine.register_model(name, model_dir)
        return {"device": engine.stats().device, **prefetch_overlap(engine, *names)}
    finally:
        engine.close()


def leftover_device_memory() -> int:
    """Bytes still allocated on the device after an engine closed (0 when nothing leaked); the
    largest tensors still alive and what refers to them are printed, to find the holder."""
    gc.collect()
    torch.cuda.empty_cache()
    held = torch.cuda.memory_allocated()
    if held > 1 << 30:
        alive = [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.is_cuda]
        alive.sort(key=lambda t: t.untyped_storage().nbytes(), reverse=True)
        for tensor in alive[:3]:
            print("alive:", tuple(tensor.shape), tensor.dtype, tensor.untyped_storage().nbytes())
            for referrer in gc.get_referrers(tensor):
                if referrer is not alive:
                    print("   held by", type(referrer).__name__, repr(referrer)[:300])
    return held


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models-dir", required=True)
    parser.add_argument("--model", default="demo-llama-7b")
    parser.add_argument("--json", dest="json_out")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of this script")
    parser.add_argument("--handoff-only", action="store_true")
    args = parser.parse_args()
    model_dir = Path(args.models_dir) / args.model
    if not model_dir.is_dir():
        from aegaeon.model_store.demo import create_demo_models

        create_demo_models(args.models_dir, large=True, progress=False)
    result: dict[str, object] = {"device": args.device, "model": args.model}
    if not args.handoff_only:
        result.update(prefetch_part(model_dir, args.model, args.device))
        print(json.dumps(result, indent=2), flush=True)  # kept even if the hand-off fails
    if args.device == "cuda":
        held = leftover_device_memory()
        result["device_bytes_held_after_close"] = held
        print(f"device memory still allocated after the engine closed: {held / 2**30:.2f} GiB")
    # Two engines of one slot each, beside each other on the one device.
    weights = load_spec(args.model, model_dir).weight_bytes
    kv = 4 << 30 if args.device == "cuda" else 256 << 20
    result.update(kv_handoff(model_dir, args.model, weights, kv, args.device))
    print(json.dumps(result, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
