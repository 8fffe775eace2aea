"""``aegaeon bench serve``: replay a trace per policy against the real stack over HTTP/SSE and
report latency percentiles, SLO attainment (both views), goodput, and the simulator beside it.

Without ``--url`` the command starts the embedded stack (``aegaeon up``) once per policy, with a
worker whose device budget holds at most half of the models' weights at once. SLOs are
multiples of the isolated latency of the largest model, measured at the start. Rates are per
model (λ, as in the paper): the total rate is λ × the number of models.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from rich.console import Console

from aegaeon.bench.serve_models import budget_fraction
from aegaeon.bench.serve_report import (
    goodput_ratio,
    policy_goodput,
    print_summary,
    sim_differences,
    write_plot,
)
from aegaeon.bench.serve_run import BenchPlan, run_policy, simulate_all, strip_records
from aegaeon.bench.serve_trace import CpuScale
from aegaeon.scheduler.policies.base import Slo

ALL_POLICIES = "aegaeon,request-level,static-mux,dedicated"
QUICK = {"models": 5, "rates": "0.1,0.3,0.8,1.6,3.0", "duration": 15.0, "drain": 20.0,
         "policies": ALL_POLICIES, "workers": 1}  # fmt: skip
DEFAULTS = {"models": 5, "rates": "0.05,0.1,0.2", "duration": 30.0, "drain": 60.0,
            "policies": ALL_POLICIES, "workers": 1}  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--url", help="a running gateway (default: start the embedded stack once per policy)")
    add("--models-dir", type=Path, help="models to serve (default: write the bench demo set)")
    add("--policies", help=f"comma-separated (default {ALL_POLICIES}); with --url, a label")
    add("--models", type=int, help="how many models (default 5)")
    add("--rates", help="comma-separated arrival rates per model, req/s")
    add("--duration", type=float, help="seconds of arrivals per rate")
    add("--drain", type=float, help="seconds after the last arrival before open requests count as unfinished")  # fmt: skip
    add("--arrival", choices=["poisson", "gamma"], default="poisson")
    add("--cv", type=float, default=1.0, help="gamma arrivals: coefficient of variation (>1 bursty)")  # fmt: skip
    add("--popularity", choices=["uniform", "zipf"], default="uniform")
    add("--zipf-s", type=float, default=1.0)
    add("--sharegpt", type=Path, help="a ShareGPT JSON file: sample real lengths (then scaled)")
    add("--length-factor", type=float, default=CpuScale.factor, help="ShareGPT lengths × this")
    add("--slo-ttft", type=float, help="TTFT SLO in seconds (default: scale × isolated)")
    add("--slo-tbt", type=float, help="TBT SLO in seconds (default: scale × isolated)")
    add("--slo-scale", type=float, default=5.0, help="TBT SLO = this × isolated TBT")
    add("--slo-ttft-scale", type=float, default=20.0,
        help="TTFT SLO = this × isolated TTFT (the paper's TTFT SLO is 100 TBT SLOs)")  # fmt: skip
    add("--arena-bytes", type=int, help="each worker's memory arena (default: 2 slots of the largest model, ×2 for KV)")  # fmt: skip
    add("--workers", type=int)
    add("--seed", type=int, default=0)
    add("--no-sim", action="store_true", help="skip the simulator comparison")
    add("--quick", action="store_true", help="demo models, embedded stack, all policies, ≤10 min")
    add("--json", type=Path, help="write the results here")
    add("--plot", type=Path, help="write a PNG plot here")


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset options from the --quick preset or the defaults."""
    preset = QUICK if args.quick else DEFAULTS
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(args: argparse.Namespace) -> int:
    args = resolve(args)
    console = Console(stderr=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="aegaeon-bench-serve-") as tmp:
        plan = BenchPlan.build(args, Path(tmp))
        console.print(plan.banner())
        result, records = run(plan, console)
    result["wall_s"] = time.monotonic() - started
    print_summary(result, Console(width=200))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    if args.plot:
        write_plot(result, records, args.plot)
    ok = any(p["finished"] for res in result["policies"].values() for p in res["points"])
    return 0 if ok else 1


def run(plan: BenchPlan, console: Console) -> tuple[dict, dict]:
    """Every policy over every rate, then the simulator, then goodput and its ratios."""
    policies: dict[str, dict] = {}
    records = {}
    for name in plan.policies:
        res, recs = run_policy(plan, name, console)
        policies[name] = res
        records[name] = recs
    if plan.run_sim and policies:
        simulate_all(plan, policies, console)
    strip_records(policies)
    return assemble(plan, policies), records


def assemble(plan: BenchPlan, policies: dict[str, dict]) -> dict:
    """The JSON result: setup, per-policy sweeps, goodput ratios, simulator agreement."""
    weights = [s.weight_bytes for s in plan.specs.values()]
    slo = plan.slo or Slo()
    result: dict = {
        "command": "aegaeon bench serve",
        "quick": plan.args.quick,
        "target": plan.url or "embedded stack, once per policy",
        "device": {
            "kind": "cpu",
            "workers": plan.args.workers,
            "arena_bytes": plan.arena_bytes,
            "weight_budget_bytes": plan.weight_budget,
            "model_weight_bytes": dict(zip(plan.specs, weights, strict=True)),
            "budget_fraction_of_weights": budget_fraction(plan.weight_budget, weights),
        },
        "models": list(plan.specs),
        "largest_model": plan.largest,
        "isolated": plan.isolated,
        "slo": {"ttft_s": slo.ttft_s, "tbt_s": slo.tbt_s, "scale": plan.slo_scale_note()},
        "scheduler_slo": {"ttft_s": plan.scheduler_slo.ttft_s, "tbt_s": plan.scheduler_slo.tbt_s},
        "trace": plan.trace_note(),
        "policies": policies,
        "notes": plan.notes,
    }
    for res in policies.values():
        res["goodput_rate_per_model"] = policy_goodput(res["points"])
        res["goodput_time_fraction"] = policy_goodput(res["points"], "time_fraction_attainment")
    lowest = min(plan.rates)
    ours = policies.get("aegaeon", {}).get("goodput_rate_per_model")
    for base, key in (("request-level", "request_level"), ("static-mux", "static_mux")):
        if ours is None or base not in policies:
            continue
        ratio, bound = goodput_ratio(ours, policies[base]["goodput_rate_per_model"], lowest)
        result[f"goodput_ratio_vs_{key}"] = ratio
        if bound is not None:
            result[f"goodput_ratio_vs_{key}_at_least"] = bound
    diffs = sim_differences(policies)
    if diffs:
        result["sim_vs_measured_abs_diff_points"] = diffs
        result["sim_vs_measured_max_abs_diff"] = max(diffs.values())
    return result


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
