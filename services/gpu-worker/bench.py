"""``aegaeon bench engine --json OUT``: switch cost, decode speed and KV swap bandwidth.

Every figure sits beside its physical or practical reference measured in the same run:
switch vs a plain copy of the same bytes, switch vs a naive reload (fresh process + transformers;
and in a warm process: ``from_pretrained`` + move + first token, the median of several),
decode vs transformers ``generate`` at the same batch, KV swap vs copy bandwidth.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from aegaeon.gpu_worker.arena import map_host_weights
from aegaeon.gpu_worker.engine import Engine, EngineConfig
from aegaeon.gpu_worker.runners.llama import attention_kernels

from aegaeon.protocol import SamplingParams

PROMPT_LEN = 32
DECODE_STEPS = 24
BATCHES = (1, 8, 32)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", dest="json_out", help="write the figures to this file")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default=None, help="demo model to measure (default: largest)")
    parser.add_argument("--models-dir", default=None, help="demo models folder (default: temp)")
    parser.add_argument("--large", action="store_true", help="create the 7B-shaped model too")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads, the same for both sides (default on the CPU: 1, since extra "
        "OpenMP threads spin-wait on a shared machine; on CUDA: torch's default)",
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn: Callable[[], Any], device: torch.device, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


SWITCH_PAIRS = 9
"""Switches and plain copies measured, taken in turns: on a shared host the speed drifts over
seconds, and three of each measured one after the other read 0.85 to 1.35 for the same engine."""


def measure_switch(engine: Engine, model: str, pairs: int = SWITCH_PAIRS) -> dict[str, float]:
    """Plain copies of the model's host bytes into the engine's slot, each followed by a switch
    to the model (one weight slot; the copy clobbered it, so every switch copies); the medians."""
    engine.switch_to(model)
    host = map_host_weights(engine.specs[model], engine.device)
    dest = engine.arena.slots[0][: host.tensor.numel()]

    def plain_copy() -> None:  # the engine's own slot as destination: same bytes, same path
        dest.copy_(host.tensor, non_blocking=host.pinned)

    switch_times, copy_times = [], []
    for _ in range(pairs):
        copy_times.append(_median_time(plain_copy, engine.device, repeats=1))
        engine.invalidate_weights()
        switch_times.append(engine.switch_to(model).seconds)
    nbytes = host.tensor.numel()
    host.release()  # unpinned now: the engine keeps its own mapping of the file
    switch, memcpy = statistics.median(switch_times), statistics.median(copy_times)
    return {"switch_s": switch, "memcpy_s": memcpy, "switch_over_memcpy": switch / memcpy,
            "weight_bytes": nbytes, "memcpy_gb_s": nbytes / memcpy / 1e9}  # fmt: skip


def measure_naive_reload(model_dir: Path, device: str, dtype: str) -> float:
    """A fresh process that imports transformers, loads the model and produces one token."""
    threads = torch.get_num_threads()
    code = (
        f"import torch, transformers\ntorch.set_num_threads({threads})\n"
        f"m = transformers.AutoModelForCausalLM.from_pretrained({str(model_dir)!r}, dtype=torch.{dtype}).to({device!r})\n"
        f"m.generate(torch.tensor([[1, 2, 3]], device={device!r}), max_new_tokens=1, do_sample=False)\n"
    )
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return time.perf_counter() - start


def measure_inprocess_reload(model_dir: Path, device: str, dtype: str, repeats: int = 3) -> float:
    """Reload in a warm process (transformers imported, one load done): ``from_pretrained`` +
    move to the device + the first token; the median of ``repeats``. The fresh-process figure
    adds interpreter and import start-up; this one is what a serving process pays per reload.
    It runs in a process of its own, beside this one: the engine here holds the same file
    mapped and page-locked, which must not change what transformers' own load costs."""
    threads = torch.get_num_threads()
    code = f"""
import statistics, time, torch, transformers
torch.set_num_threads({threads})
transformers.utils.logging.disable_progress_bar()
dev = torch.device({device!r})
prompt = torch.tensor([[1, 2, 3]], device=dev)
def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
def reload():
    sync()
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained({str(model_dir)!r}, dtype=torch.{dtype})
    model = model.to(dev).eval()
    with torch.inference_mode():
        model.generate(prompt, max_new_tokens=1, do_sample=False)
    sync()
    del model
    return time.perf_counter() - start
reload()
print(statistics.median(reload() for _ in range({repeats})))
"""
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return float(done.stdout.strip().splitlines()[-1])


def reload_figures(model_dir: Path, device: str, dtype: str, switch_s: float) -> dict[str, float]:
    """Reloading the model without a switch, in a fresh process and in a warm one, each beside
    the switch it would replace."""
    naive = measure_naive_reload(model_dir, device, dtype)
    warm = measure_inprocess_reload(model_dir, device, dtype)
    return {"naive_reload_s": naive, "naive_over_switch": naive / switch_s,
            "inprocess_reload_s": warm, "inprocess_reload_over_switch": warm / switch_s}  # fmt: skip


def _engine_decode(engine: Engine, model: str, batch: int, tag: str = "") -> float:
    sampling = SamplingParams(max_tokens=DECODE_STEPS + 1, temperature=0.0, ignore_eos=True)
    ids = [f"bench-{tag}{batch}-{i}" for i in range(batch)]
    for i, rid in enumerate(ids):
        engine.add_request(rid, model, [(7 * i + j) % 500 + 1 for j in range(PROMPT_LEN)], sampling)
    engine.step(ids)  # prefill
    _sync(engine.device)
    start = time.perf_counter()
    for _ in range(DECODE_STEPS):
        engine.step(ids)
    _sync(engine.device)
    return batch * DECODE_STEPS / (time.perf_counter() - start)


def _hf_decode(hf: Any, device: torch.device, batch: int) -> float:
    ids = torch.tensor(
        [[(7 * i + j) % 500 + 1 for j in range(PROMPT_LEN)] for i in range(batch)], device=device
    )

    def run(n: int) -> float:
        _sync(device)
        start = time.perf_counter()
        mask = torch.ones_like(ids)
        hf.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
        _sync(device)
        return time.perf_counter() - start

    run(2)  # warm-up
    decode = run(DECODE_STEPS + 1) - run(1)  # generate's own prefill subtracted
    return batch * DECODE_STEPS / decode


def measure_decode(engine: Engine, model: str) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    spec = engine.specs[model]
    hf: Any = AutoModelForCausalLM.from_pretrained(spec.model_dir, dtype=engine.dtype)
    hf = hf.to(engine.device).eval()
    out: dict[str, float] = {}
    for batch in BATCHES:
        # Each side warms up at this batch size first (transformers: inside _hf_decode): the
        # first call at a new shape picks and loads its kernels.
        _engine_decode(engine, model, batch, tag="warm-up-")
        out[f"decode_tok_s_b{batch}"] = _engine_decode(engine, model, batch)
        if engine.graphs.enabled:  # CUDA: the same steps launched kernel by kernel, beside
            engine.graphs.enabled = False
            out[f"decode_tok_s_b{batch}_no_graphs"] = _engine_decode(engine, model, batch, "eager-")
            engine.graphs.enabled = True
            assert not engine.request_ids()  # a replay rewrites its last inputs' K/V rows
            replays = engine.graphs.replay_seconds()
            widest = max(n for b, n in replays if b == batch)  # the bench's lengths: one bucket
            out[f"graph_step_ms_b{batch}"] = 1e3 * replays[(batch, widest)]
        with torch.inference_mode(), attention_kernels(engine.device):  # the engine's choice
            out[f"hf_decode_tok_s_b{batch}"] = _hf_decode(hf, engine.device, batch)
        out[f"decode_over_hf_b{batch}"] = (
            out[f"decode_tok_s_b{batch}"] / out[f"hf_decode_tok_s_b{batch}"]
        )
    del hf
    return out


def measure_read_bandwidth(device: torch.device) -> float:
    """Bytes per second a streaming *read* of a buffer far larger than the caches achieves
    (median of several): decode reads weights and KV, it writes almost nothing."""
    n = 1 << 30 if device.type == "cuda" else 256 << 20
    buf = torch.ones(n // 4, dtype=torch.float32, device=device)
    buf.sum()  # warm-up: pages touched, kernels loaded
    return n / _median_time(buf.sum, device, repeats=7)


def measure_matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul in the engine's dtype (median of several)."""
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b  # warm-up
    return 2 * n**3 / _median_time(lambda: a @ b, device, repeats=5)


def roofline_fractions(
    result: dict[str, Any], read_bytes_s: float, flops_s: float, params: int, kv_per_token: int
) -> dict[str, float]:
    """Measured decode tokens/s over the roofline's, per batch: a step must read the weights
    and each request's KV (prompt + half the decode, on average) and do 2 × params FLOPs per
    request; the roofline step time is the larger of the two bounds."""
    out = {}
    context = PROMPT_LEN + DECODE_STEPS // 2
    for batch in BATCHES:
        step_bytes = result["weight_bytes"] + batch * context * kv_per_token
        step_s = max(step_bytes / read_bytes_s, 2 * params * batch / flops_s)
        out[f"roofline_fraction_b{batch}"] = result[f"decode_tok_s_b{batch}"] * step_s / batch
        if f"graph_step_ms_b{batch}" in result:  # the device's share: one graph replay alone
            out[f"roofline_fraction_graph_b{batch}"] = step_s / (result[f"graph_step_ms_b{batch}"] / 1e3)  # fmt: skip
    return out


def measure_kv_swap(engine: Engine, model: str) -> dict[str, float]:
    """Swap a batch's KV out to the host pool and back; GB/s over the bytes moved."""
    sampling = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    ids = [f"swap-{i}" for i in range(8)]
    for rid in ids:
        engine.add_request(rid, model, list(range(1, 257)), sampling)
    engine.step(ids)
    kv = engine._paged_kv(model)
    nbytes = sum(len(engine._requests[r].blocks) for r in ids) * kv.block_elems * engine.esize

    def round_trip() -> None:
        engine.swap_out(ids)
        engine.swap_in(ids)

    out_s = _median_time(round_trip, engine.device)
    for rid in ids:
        engine.abort(rid)
    return {"kv_swap_gb_s": 2 * nbytes / out_s / 1e9, "kv_swap_bytes": nbytes}


def _bench_config(device: str, model_dir: Path) -> EngineConfig:
    """One weight slot (every switch copies) and room left on the device for transformers' copy."""
    from aegaeon.weights import read_index

    weights = (
        (read_index(model_dir / "model.safetensors").data_bytes * 11 // 10 + 4095) // 4096 * 4096
    )
    kv = (4 << 30) if device.startswith("cuda") else (512 << 20)
    return EngineConfig(device=device, weight_slots=1, arena_bytes=weights + kv,
                        weight_budget_bytes=weights, host_kv_bytes=2 * kv)  # fmt: skip


def run_bench(args: argparse.Namespace) -> dict[str, Any]:

    threads = args.threads or (1 if args.device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)  # on a shared CPU, spinning extra threads costs more
    models_dir = Path(args.models_dir or tempfile.mkdtemp(prefix="aegaeon-bench-"))
    try:
        return _run_in(models_dir, args)
    finally:
        if not args.models_dir:
            shutil.rmtree(models_dir, ignore_errors=True)


def _run_in(models_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    from aegaeon.model_store.demo import create_demo_models

    create_demo_models(models_dir, large=args.large, progress=True)
    model = args.model or (
        "demo-llama-7b" if (models_dir / "demo-llama-7b").is_dir() else "demo-mistral"
    )
    device = torch.device(args.device)
    engine = Engine(_bench_config(args.device, models_dir / model))
    try:
        engine.register_model(model, models_dir / model)
        dtype = str(engine.dtype).removeprefix("torch.")
        result: dict[str, Any] = {"device": engine.stats().device, "model": model, "dtype": dtype,
                                  "threads": torch.get_num_threads()}  # fmt: skip
        result.update(measure_switch(engine, model))
        result.update(reload_figures(models_dir / model, args.device, dtype, result["switch_s"]))
        result.update(measure_decode(engine, model))
        read = measure_read_bandwidth(device)
        peak = measure_matmul_peak(device, engine.dtype)
        result["read_gb_s"], result["matmul_gflop_s"] = read / 1e9, peak / 1e9
        spec = engine.specs[model]
        params = spec.index.data_bytes // engine.esize
        kv_per_token = spec.kv_shape.bytes_per_token(engine.esize)
        result.update(roofline_fractions(result, read, peak, params, kv_per_token))
        result.update(measure_kv_swap(engine, model))
    finally:
        engine.close()
    return result


GOALS = {"switch_over_memcpy": ("<=", 1.3), "naive_over_switch": (">=", 50.0),
         "decode_over_hf_b1": (">=", 1.5), "decode_over_hf_b8": (">=", 3.0),
         "roofline_fraction_b1": (">=", 0.9), "roofline_fraction_b8": (">=", 0.8)}  # fmt: skip


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"aegaeon bench engine: {result['model']} on {result['device']}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("goal")
    for key, value in result.items():
        if key in ("device", "model"):
            continue
        goal = GOALS.get(key)
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        met = (
            ""
            if goal is None
            else (f"{goal[0]} {goal[1]} " + ("ok" if _met(value, goal) else "MISSED"))
        )
        table.add_row(key, shown, met)
    Console().print(table)


def _met(value: float, goal: tuple[str, float]) -> bool:
    return value <= goal[1] if goal[0] == "<=" else value >= goal[1]


def main(args: argparse.Namespace) -> int:
    result = run_bench(args)
    print_table(result)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2))
    return 0
