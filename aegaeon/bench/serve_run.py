"""The run of ``bench serve``: its plan (models, device budget, traces) and the SLO calibrated once
on a stack of its own, which every policy's scheduler then plans for. The policies' sweeps are
``serve_sweep``'s; the simulator over the same traces is ``serve_sim``'s."""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from aegaeon.bench.serve_models import device_budget, model_specs, write_bench_models
from aegaeon.bench.serve_priority import MAX_WAIT_IN_TTFT, classes_for, with_classes
from aegaeon.bench.serve_replay import isolated_latency, warm_up
from aegaeon.bench.serve_trace import PAPER_TTFT_IN_TBT, CpuScale, clamp_lengths, scaled_slo
from aegaeon.bench.stack_process import StackProcess
from aegaeon.scheduler.estimators import Estimator
from aegaeon.scheduler.policies import POLICIES
from aegaeon.scheduler.policies.base import InstanceView, ModelSpec, Slo
from aegaeon.workload import TraceRequest, generate_trace, load_sharegpt

CALIBRATION_POLICY = "request-level"  # a lone request runs uninterrupted under it
CALIBRATION_REPEATS = 21
"""The SLO is the median of this many isolated requests (after a warm-up), about 0.3 s each on
the CPU. Single requests on a shared 2-core host spread by ±15 %: with 7 the two runs of one
`--repeat 2` on 2026-12-07 calibrated TBT SLOs 14.6 and 17.5 ms from overlapping samples, and
that fifth of the SLO moved aegaeon's λ 0.4 point from 61 % to 100 % (the simulator, free of
the host's noise, read 67 % and 100 % there under the two SLOs)."""


@dataclass
class BenchPlan:
    """Everything fixed before the first request: models, budget, traces per rate; the SLO once
    calibrated (or given)."""

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
    notes: list[str] = field(default_factory=list)
    engine_cost: Estimator | None = None  # the in-process engine's times, fitted once
    classes: dict[str, str] = field(default_factory=dict)  # --priorities: model → class
    run_index: int = 0  # which of --repeat's runs is in progress

    @classmethod
    def build(cls, args: argparse.Namespace, tmp: Path) -> BenchPlan:
        models_dir, names = _models(args, tmp)
        specs = model_specs(models_dir, names) if models_dir else {n: ModelSpec(n, 0, 0) for n in names}  # fmt: skip
        arena, weights = device_budget([s.weight_bytes for s in specs.values()] or [0])
        if args.arena_bytes:
            arena, weights = args.arena_bytes, args.arena_bytes // 2
        rates = sorted(float(r) for r in str(args.rates).split(",") if r)
        scale = CpuScale(factor=args.length_factor)
        pairs = load_sharegpt(args.sharegpt) if args.sharegpt else None
        traces = {rate: _trace(args, names, rate, scale, pairs) for rate in rates}
        policies = [p.strip() for p in str(args.policies).split(",") if p.strip()]
        unknown = [p for p in policies if p not in POLICIES]
        if unknown and not args.url:
            raise SystemExit(f"bench serve: unknown policies {unknown}; known: {sorted(POLICIES)}")
        if args.url:  # one running stack, one policy: the name is only a label
            policies = policies[:1] if len(policies) == 1 else ["remote"]
        plan = cls(args, tmp, models_dir, specs, _vocab(models_dir, names), arena, weights,
                   rates, traces, scale, policies, url=args.url.rstrip("/") if args.url else None)  # fmt: skip
        if args.slo_ttft and args.slo_tbt:
            plan.slo = Slo(args.slo_ttft, args.slo_tbt)
        if args.priorities:
            plan.set_classes(args.priorities)
        plan.notes += _notes(plan)
        return plan

    def set_classes(self, spec: str) -> None:
        """Each model's class (``--priorities``): in the specs the simulator's policy gets and,
        for a stack this command starts, in the models directory's lifecycle book, where the
        model-store reads it (with ``--url`` the running stack's classes are its own)."""
        try:
            self.classes = classes_for(list(self.specs), spec)
        except ValueError as exc:
            raise SystemExit(f"bench serve: {exc}") from None
        self.specs = with_classes(self.specs, self.classes)
        if self.url is None and self.models_dir is not None:
            from aegaeon.model_store.lifecycle import record_serving

            for name, cls in self.classes.items():
                record_serving(self.models_dir, name, priority=cls)
        else:
            self.notes.append("--priorities with --url labels the report and the simulator only: "
                              "the running stack serves with the classes its store holds")  # fmt: skip

    @property
    def max_wait_s(self) -> float | None:
        """The scheduler's maximum wait: --max-wait, else with classes a multiple of the TTFT
        SLO (None: the scheduler's default)."""
        if self.args.max_wait is not None:
            return float(self.args.max_wait)
        if self.classes and self.slo is not None:
            return MAX_WAIT_IN_TTFT * self.slo.ttft_s
        return None

    @property
    def largest(self) -> str:
        return max(self.specs, key=lambda n: (self.specs[n].weight_bytes, n))

    @property
    def run_sim(self) -> bool:
        return not self.args.no_sim and self.models_dir is not None

    @property
    def min_requests_per_point(self) -> int:
        return min((len(t) for t in self.traces.values()), default=0)

    def slo_scale_note(self) -> dict:
        """The multiples of isolated latency the SLOs are (None where given in seconds)."""
        return {
            "ttft": None
            if self.args.slo_ttft
            else (
                f"{self.args.slo_ttft_scale} × isolated TTFT"
                if self.args.slo_ttft_scale
                else f"{PAPER_TTFT_IN_TBT * self.scale.factor:g} × the TBT SLO (the paper's "
                f"100 × length factor {self.scale.factor})"
            ),
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
            "min_requests_per_point": args.min_requests,
            "arrival_span_s": {str(r): t[-1].arrival if t else 0.0 for r, t in self.traces.items()},
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
            f"λ/model {self.rates}, ≥ {self.min_requests_per_point} requests per rate"
        )

    def instances(self) -> list[InstanceView]:
        """The workers as the scheduler sees them (KV capacity in the largest KV's tokens)."""
        kv = max(s.kv_bytes_per_token for s in self.specs.values())
        capacity = (self.arena_bytes - self.weight_budget) // max(1, kv)
        return [InstanceView(f"worker-{i}", "both", capacity, self.weight_budget)
                for i in range(self.args.workers)]  # fmt: skip

    def stack_args(self) -> list[str]:
        """``aegaeon up`` flags every policy's stack gets: the same arena and the same SLO."""
        extra = ["--arena-bytes", str(self.arena_bytes)]
        if self.slo is not None:
            extra += ["--slo-ttft", repr(self.slo.ttft_s), "--slo-tbt", repr(self.slo.tbt_s)]
        if self.max_wait_s is not None:
            extra += ["--max-wait", repr(self.max_wait_s)]
        return extra


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
    """``--duration`` seconds of arrivals, or longer at a low rate: at least ``--min-requests``
    requests (a point of 4 requests decides nothing)."""
    scaled = [(round(a * scale.factor), round(b * scale.factor)) for a, b in pairs] if pairs else None  # fmt: skip
    total_rate = rate * max(1, len(names))
    duration = max(args.duration, args.min_requests / total_rate)
    while True:
        trace = generate_trace(
            names, rate, duration, popularity=args.popularity, zipf_s=args.zipf_s,
            arrival=args.arrival, cv=args.cv, lengths=scale.lengths(), sharegpt=scaled,
            seed=args.seed,
        )  # fmt: skip
        if len(trace) >= args.min_requests:
            break
        duration *= 1.25  # a sparse draw: longer, then cut back to the minimum below
    if duration > args.duration:
        trace = trace[: args.min_requests]
    return clamp_lengths(trace, scale)


def _notes(plan: BenchPlan) -> list[str]:
    notes = [
        "rates are per model; total arrival rate = rate × number of models",
        "the SLO is calibrated once, on a separate stack, from the isolated latency of the "
        "largest model (see slo.scale); every policy's scheduler plans for that same SLO",
        "every policy replays the same trace per rate; a rate's trace spans --duration seconds "
        "or, at low rates, as long as --min-requests arrivals take",
        "policies are measured side by side: each has its own stack, all started first; at each "
        "rate every policy still in its sweep replays the trace in turn, the order rotated by "
        "one from rate to rate (points[].measured_order), so a drift of the host's speed "
        "during the run falls on every policy alike",
        "goodput = the highest rate at and below which every measured rate reaches ≥ 90% strict "
        "attainment; a sweep stops after its first miss (higher rates cannot raise goodput) "
        "unless --sweep-all",
    ]
    if "dedicated" in plan.policies and plan.args.workers < len(plan.specs):
        notes.append(
            f"dedicated on {plan.args.workers} worker(s) serves only {plan.args.workers} of "
            f"{len(plan.specs)} models (it needs one instance per model); requests for the "
            "others are refused (503) and count as misses"
        )
    return notes


# ------------------------------------------------------------------ the SLO, once


def calibrate(plan: BenchPlan, console: Console) -> None:
    """Measure the isolated latency of the largest model on a stack of its own (or on --url)
    and set the plan's SLO from it (unless given in seconds)."""
    if plan.url:
        isolated = asyncio.run(_isolated(plan, plan.url))
    else:
        policy = CALIBRATION_POLICY if CALIBRATION_POLICY in POLICIES else plan.policies[0]
        home = plan.tmp / f"home-{plan.run_index}-calibrate"
        try:
            with StackProcess(home, models_dir=plan.models_dir, workers=plan.args.workers,
                              policy=policy, extra_args=plan.stack_args()) as stack:  # fmt: skip
                isolated = asyncio.run(_isolated(plan, stack.url)) | {"policy": policy}
        except (RuntimeError, TimeoutError) as exc:
            isolated = {"model": plan.largest, "error": str(exc)[:300]}
    plan.isolated = isolated
    console.print(f"  calibration: isolated {plan.largest}: {isolated}")
    if "ttft_s" not in isolated:
        return
    slo = scaled_slo(isolated["ttft_s"], isolated["tbt_s"], plan.args.slo_scale,
                     plan.args.slo_ttft_scale, plan.scale.factor)  # fmt: skip
    plan.slo = Slo(plan.args.slo_ttft or slo.ttft_s, plan.args.slo_tbt or slo.tbt_s)
    console.print(f"  SLO TTFT {plan.slo.ttft_s:.3f} s, TBT {plan.slo.tbt_s * 1e3:.1f} ms")


async def _isolated(plan: BenchPlan, url: str) -> dict:
    """Isolated latency of the largest model (or why it failed)."""
    dist = plan.scale.lengths()
    prompt = int(min(plan.scale.max_input, max(plan.scale.min_input, dist.input_median)))
    output = int(min(plan.scale.max_output, max(plan.scale.min_output, dist.output_median)))
    found: dict = {"model": plan.largest, "prompt_len": prompt, "output_len": output}
    # Every model once first, as before a sweep: the first loads (host cache, first kernels)
    # are done and the stack is idle when the isolated requests run.
    failures = await warm_up(url, list(plan.specs), plan.vocab)
    try:
        ttfts, tbts = await isolated_latency(url, plan.largest, prompt, output, plan.vocab,
                                             repeats=CALIBRATION_REPEATS)  # fmt: skip
    except RuntimeError as exc:
        return found | {"error": str(exc)[:300], "warm_up_failures": failures}
    return found | {"ttft_s": statistics.median(ttfts), "tbt_s": statistics.median(tbts),
                    "ttft_samples_s": ttfts, "tbt_samples_s": tbts}  # fmt: skip
