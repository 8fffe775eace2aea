"""The run of ``bench serve``: its plan (models, device budget, traces, SLO), one policy's sweep
against the real stack, and the simulator over the same traces."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from aegaeon.bench.serve_models import device_budget, model_specs, write_bench_models
from aegaeon.bench.serve_replay import isolated_latency, replay, warm_up
from aegaeon.bench.serve_sim import (
    add_path_overhead,
    path_overhead,
    profile_engine,
    simulate_measured,
)
from aegaeon.bench.serve_trace import CpuScale, clamp_lengths, realized_trace, scaled_slo
from aegaeon.bench.stack_process import StackProcess
from aegaeon.scheduler.estimators import Estimator
from aegaeon.scheduler.policies.base import InstanceView, ModelSpec, Slo
from aegaeon.sim.run import POLICIES
from aegaeon.slo_metrics import RequestRecord, summarize
from aegaeon.workload import TraceRequest, generate_trace, load_sharegpt

SCHEDULER_DEFAULT_SLO = Slo()  # `aegaeon up` starts the scheduler with its defaults (10 s, 0.1 s)
ERROR_LINE = re.compile(r"Traceback|\bERROR\b|\bCRITICAL\b")


@dataclass
class BenchPlan:
    """Everything fixed before the first request: models, budget, traces per rate, SLO."""

    args: argparse.Namespace
    tmp: Path
    models_dir: Path | None
    specs: dict[str, ModelSpec]
    vocab: int
    arena_bytes: int
    weight_budget: int
    rates: list[float]
    traces: dict[float, list[TraceRequest]]
    scale: CpuScale
    policies: list[str]
    url: str | None = None
    slo: Slo | None = None
    isolated: dict = field(default_factory=dict)
    scheduler_slo: Slo = SCHEDULER_DEFAULT_SLO
    notes: list[str] = field(default_factory=list)
    cost: Estimator | None = None

    @classmethod
    def build(cls, args: argparse.Namespace, tmp: Path) -> BenchPlan:
        models_dir, names = _models(args, tmp)
        specs = model_specs(models_dir, names) if models_dir else {n: ModelSpec(n, 0, 0) for n in names}  # fmt: skip
        arena, weights = device_budget([s.weight_bytes for s in specs.values()] or [0])
        if args.arena_bytes:
            arena, weights = args.arena_bytes, args.arena_bytes // 2
        rates = [float(r) for r in str(args.rates).split(",") if r]
        scale = CpuScale(factor=args.length_factor)
        pairs = load_sharegpt(args.sharegpt) if args.sharegpt else None
        traces = {rate: _trace(args, names, rate, scale, pairs) for rate in rates}
        policies = [p.strip() for p in str(args.policies).split(",") if p.strip()]
        if args.url:  # one running stack, one policy: the name is only a label
            policies = policies[:1] if len(policies) == 1 else ["remote"]
        # The SLO comes from the first policy's isolated run: request-level serves a lone
        # request uninterrupted, so it goes first; dedicated may not own the largest model.
        policies.sort(key=lambda p: (p != "request-level", p == "dedicated"))
        plan = cls(args, tmp, models_dir, specs, _vocab(models_dir, names), arena, weights,
                   rates, traces, scale, policies, url=args.url.rstrip("/") if args.url else None)  # fmt: skip
        if args.slo_ttft and args.slo_tbt:
            plan.slo = Slo(args.slo_ttft, args.slo_tbt)
        plan.notes += _notes(plan)
        return plan

    @property
    def largest(self) -> str:
        return max(self.specs, key=lambda n: (self.specs[n].weight_bytes, n))

    @property
    def run_sim(self) -> bool:
        return not self.args.no_sim and self.models_dir is not None

    def slo_scale_note(self) -> dict:
        """The multiples of isolated latency the SLOs are (None where given in seconds)."""
        return {
            "ttft": None if self.args.slo_ttft else float(self.args.slo_ttft_scale),
            "tbt": None if self.args.slo_tbt else float(self.args.slo_scale),
        }

    def trace_note(self) -> dict:
        args = self.args
        lengths = f"sharegpt file {args.sharegpt}" if args.sharegpt else "sharegpt-like lognormal"
        return {
            "arrival": args.arrival,
            "cv": args.cv,
            "popularity": args.popularity,
            "zipf_s": args.zipf_s,
            "duration_s": args.duration,
            "drain_s": args.drain,
            "seed": args.seed,
            "lengths": lengths,
            "cpu_scaling": self.scale.describe(),
            "requests_per_rate": {str(r): len(t) for r, t in self.traces.items()},
        }

    def banner(self) -> str:
        mib = 1 << 20
        total = sum(s.weight_bytes for s in self.specs.values())
        return (
            f"bench serve: {len(self.specs)} models ({total / mib:.0f} MiB of weights), "
            f"worker weight budget {self.weight_budget / mib:.0f} MiB "
            f"(arena {self.arena_bytes / mib:.0f} MiB), policies {', '.join(self.policies)}, "
            f"λ/model {self.rates}, {self.args.duration:g} s each"
        )

    def instances(self) -> list[InstanceView]:
        """The workers as the scheduler sees them (KV capacity in the largest KV's tokens)."""
        kv = max(s.kv_bytes_per_token for s in self.specs.values())
        capacity = (self.arena_bytes - self.weight_budget) // max(1, kv)
        return [InstanceView(f"worker-{i}", "both", capacity, self.weight_budget)
                for i in range(self.args.workers)]  # fmt: skip


def _models(args: argparse.Namespace, tmp: Path) -> tuple[Path | None, list[str]]:
    if args.models_dir is None and args.url is None:
        out = tmp / "models"
        return out, write_bench_models(out, args.models)
    if args.models_dir is None:
        raise SystemExit("bench serve: with --url, give --models-dir (names, sizes, vocabulary)")
    names = sorted(p.parent.name for p in args.models_dir.glob("*/config.json"))
    return args.models_dir, names[: args.models]


def _vocab(models_dir: Path | None, names: list[str]) -> int:
    if models_dir is None:
        return 256
    sizes = [json.loads((models_dir / n / "config.json").read_text()).get("vocab_size", 256)
             for n in names]  # fmt: skip
    return int(min(sizes))


def _trace(args: argparse.Namespace, names: list[str], rate: float, scale: CpuScale,
           pairs: list[tuple[int, int]] | None) -> list[TraceRequest]:  # fmt: skip
    scaled = [(round(a * scale.factor), round(b * scale.factor)) for a, b in pairs] if pairs else None  # fmt: skip
    trace = generate_trace(
        names, rate, args.duration, popularity=args.popularity, zipf_s=args.zipf_s,
        arrival=args.arrival, cv=args.cv, lengths=scale.lengths(), sharegpt=scaled, seed=args.seed,
    )  # fmt: skip
    return clamp_lengths(trace, scale)


def _notes(plan: BenchPlan) -> list[str]:
    notes = [
        "rates are per model; total arrival rate = rate × number of models",
        "SLOs are multiples of the isolated latency of the largest model (see slo.scale)",
        "the gateway ignores `ignore_eos` (not in its request schema), so a request may end at "
        "EOS before its traced length; the simulator replays the realized lengths",
        "`aegaeon up` does not pass SLOs or a profile to the scheduler: it schedules with its "
        "defaults (TTFT 10 s, TBT 0.1 s) and roofline estimates; the simulator mirrors that",
    ]
    if "dedicated" in plan.policies and plan.args.workers < len(plan.specs):
        notes.append(
            f"dedicated on {plan.args.workers} worker(s) serves only {plan.args.workers} of "
            f"{len(plan.specs)} models (it needs one instance per model); requests for the "
            "others are refused (503) and count as misses"
        )
    return notes


# ------------------------------------------------------------------ one policy


def run_policy(plan: BenchPlan, name: str, console: Console) -> tuple[dict, list[RequestRecord]]:
    """Start the stack with ``name`` (or use --url), warm it, sweep the rates."""
    if plan.url:
        result = asyncio.run(_sweep(plan, name, plan.url, console))
        return result, _highest_rate_records(result)
    home = plan.tmp / f"home-{name}"
    extra = ["--arena-bytes", str(plan.arena_bytes)]
    if plan.slo is not None:
        # The scheduler plans its quotas for the SLO the run is judged by (the first stack,
        # run before the SLO is measured, is request-level, which does not use it).
        extra += ["--slo-ttft", str(plan.slo.ttft_s), "--slo-tbt", str(plan.slo.tbt_s)]
    scheduler_slo = plan.slo or SCHEDULER_DEFAULT_SLO
    try:
        with StackProcess(home, models_dir=plan.models_dir, workers=plan.args.workers,
                          policy=name, extra_args=extra) as stack:  # fmt: skip
            result = asyncio.run(_sweep(plan, name, stack.url, console))
    except (RuntimeError, TimeoutError) as exc:
        result = {"points": [], "error": str(exc)}
    result["stack_errors"] = stack_errors(home / "logs")
    result["scheduler_slo"] = {"ttft_s": scheduler_slo.ttft_s, "tbt_s": scheduler_slo.tbt_s}
    return result, _highest_rate_records(result)


def _highest_rate_records(result: dict) -> list[RequestRecord]:
    """Records of the highest rate (for the CDF plot)."""
    points = result["points"]
    return list(points[-1]["records"]) if points else []


async def _sweep(plan: BenchPlan, name: str, url: str, console: Console) -> dict:
    failures = await warm_up(url, list(plan.specs), plan.vocab)
    isolated = await _isolated(plan, url)
    console.print(f"  {name}: isolated {plan.largest}: {isolated}")
    if plan.slo is None:
        _set_slo(plan, isolated, console)
    if plan.slo is None:
        return {"points": [], "isolated": isolated, "error": "no SLO: isolated run failed"}
    points = []
    for rate in plan.rates:
        trace = plan.traces[rate]
        run = await replay(url, trace, vocab=plan.vocab, seed=plan.args.seed,
                           drain_s=plan.args.drain, label=f"{name} λ={rate:g}")  # fmt: skip
        point = {"rate_per_model": rate, "total_rate": rate * len(plan.specs),
                 **summarize(run.records, plan.slo), "errors": dict(run.errors),
                 "wall_s": run.wall_s, "records": run.records}  # fmt: skip
        points.append(point)
        console.print(f"  {name} λ={rate:g}: attainment {point['attainment']:.0%} "
                      f"({point['finished']}/{point['requests']} finished) {dict(run.errors) or ''}")  # fmt: skip
    return {"points": points, "warm_up_failures": failures, "isolated": isolated}


async def _isolated(plan: BenchPlan, url: str) -> dict:
    """Isolated latency of the largest model under this stack's policy (or why it failed)."""
    dist = plan.scale.lengths()
    prompt = int(min(plan.scale.max_input, max(plan.scale.min_input, dist.input_median)))
    output = int(min(plan.scale.max_output, max(plan.scale.min_output, dist.output_median)))
    found: dict = {"model": plan.largest, "prompt_len": prompt, "output_len": output}
    try:
        ttft, tbt = await isolated_latency(url, plan.largest, prompt, output, plan.vocab)
    except RuntimeError as exc:
        return found | {"error": str(exc)[:300]}
    return found | {"ttft_s": ttft, "tbt_s": tbt}


def _set_slo(plan: BenchPlan, isolated: dict, console: Console) -> None:
    """SLO = multiples of the first policy's isolated latency (or the seconds given)."""
    if "ttft_s" not in isolated:
        return
    plan.isolated = dict(isolated)
    slo = scaled_slo(isolated["ttft_s"], isolated["tbt_s"], plan.args.slo_scale,
                     plan.args.slo_ttft_scale)  # fmt: skip
    plan.slo = Slo(plan.args.slo_ttft or slo.ttft_s, plan.args.slo_tbt or slo.tbt_s)
    console.print(f"  SLO TTFT {plan.slo.ttft_s:.2f} s, TBT {plan.slo.tbt_s * 1e3:.0f} ms")


def stack_errors(logs: Path, limit: int = 8) -> dict:
    """Error lines the services logged during the run (a benchmark must not hide them)."""
    counts: Counter = Counter()
    first: list[str] = []
    for log in sorted(logs.glob("*.log")) if logs.is_dir() else []:
        for line in log.read_text(errors="replace").splitlines():
            if ERROR_LINE.search(line):
                counts[log.stem] += 1
                if len(first) < limit:
                    first.append(f"{log.stem}: {line.strip()[:300]}")
    return {"counts": dict(counts), "first": first}


# ------------------------------------------------------------------ the simulator


def simulate_all(plan: BenchPlan, policies: dict[str, dict], console: Console) -> None:
    """Fit the CPU cost model, then predict every measured point; adds ``sim`` to each point."""
    assert plan.models_dir is not None
    console.print("  profiling the engine in-process for the simulator's cost model …")
    cost = profile_engine(plan.models_dir, plan.specs, plan.arena_bytes)
    iso = plan.isolated
    if iso:
        pre, dec = path_overhead(cost, iso["model"], iso["prompt_len"], iso["output_len"],
                                 iso["ttft_s"], iso["tbt_s"])  # fmt: skip
        iso["stack_overhead_prefill_s"], iso["stack_overhead_step_s"] = pre, dec
        cost = add_path_overhead(cost, pre, dec)
    plan.cost = cost
    assert plan.slo is not None
    for name, res in policies.items():
        if name not in POLICIES:
            continue
        for point in res["points"]:
            trace = realized_trace(plan.traces[point["rate_per_model"]], point["records"])
            planned = res.get("scheduler_slo")
            scheduler_slo = Slo(**planned) if planned else plan.scheduler_slo
            point["sim"] = simulate_measured(trace, name, plan.specs, plan.instances(), cost,
                                             scheduler_slo, plan.slo)  # fmt: skip


def strip_records(policies: dict[str, dict]) -> None:
    """Drop the raw records before writing JSON."""
    for res in policies.values():
        for point in res["points"]:
            point.pop("records", None)
