"""``aegaeon sim``: how many GPUs a trace needs at given SLOs, per policy, in simulation.

    aegaeon sim --gpu H800 --models 40 --rate 0.1 --json out.json
    aegaeon sim --gpus 8 --policy aegaeon          # attainment at a fixed GPU count
    aegaeon sim --paper --json paper.json          # the paper's grid (DESIGN.md §7)

The cost model is a roofline of ``--gpu`` or, with ``--profile``, the fitted profiles that
``aegaeon profile`` wrote. The trace is Poisson (or Gamma with ``--cv``) per model with
ShareGPT-like lengths; ``--sharegpt FILE`` samples real lengths instead.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from aegaeon.scheduler.estimators import load_estimator
from aegaeon.scheduler.policies.base import Slo
from aegaeon.sim.hardware import DEVICES, device_spec, paper_models
from aegaeon.sim.run import Deployment, run_deployment
from aegaeon.sim.study import (
    ALL_POLICIES,
    Setting,
    gpus_needed,
    headline,
    paper_settings,
    run_setting,
)
from aegaeon.workload import SHAREGPT, generate_trace, load_sharegpt


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``aegaeon sim``."""
    parser.add_argument("--gpu", default="H800", choices=sorted(DEVICES), help="roofline device")
    parser.add_argument("--profile", help="fitted profile JSON (aegaeon profile) instead")
    parser.add_argument("--models", type=int, default=40, help="number of models (paper mix)")
    parser.add_argument("--rate", type=float, default=0.1, help="requests/s per model")
    parser.add_argument("--policy", action="append", choices=ALL_POLICIES, help="repeatable")
    parser.add_argument("--slo-ttft", type=float, default=10.0, help="seconds")
    parser.add_argument("--slo-tbt", type=float, default=0.1, help="seconds")
    parser.add_argument("--duration", type=float, default=300.0, help="simulated trace seconds")
    parser.add_argument("--gpus", type=int, help="simulate this many GPUs instead of searching")
    parser.add_argument("--prefill", type=int, default=0, help="aegaeon prefill instances (--gpus)")
    parser.add_argument("--popularity", choices=("uniform", "zipf"), default="uniform")
    parser.add_argument("--cv", type=float, default=1.0, help="arrival CV (>1: bursty Gamma)")
    parser.add_argument("--sharegpt", help="ShareGPT JSON to sample lengths from")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--metric", default="attainment",
                        choices=("attainment", "time_fraction_attainment"))  # fmt: skip
    parser.add_argument("--paper", action="store_true", help="the paper's grid")
    parser.add_argument("--quick", action="store_true", help="--paper: paper SLOs only, shorter")
    parser.add_argument("--json", help="write the results here")


def main(args: argparse.Namespace) -> int:
    """Run the command."""
    started = time.monotonic()
    out = paper(args) if args.paper else single(args)
    out["wall_s"] = round(time.monotonic() - started, 1)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    return 0


def single(args: argparse.Namespace) -> dict:
    """One setting: a GPU search per policy, or attainment at ``--gpus``."""
    from aegaeon.sim.report import print_setting

    device = device_spec(args.gpu)
    slo = Slo(args.slo_ttft, args.slo_tbt)
    models = paper_models(args.models)
    pairs = load_sharegpt(args.sharegpt) if args.sharegpt else None
    trace = generate_trace(
        list(models), args.rate, args.duration, popularity=args.popularity,
        arrival="gamma" if args.cv != 1.0 else "poisson", cv=args.cv, lengths=SHAREGPT,
        sharegpt=pairs, seed=args.seed,
    )  # fmt: skip
    cost = load_estimator(args.profile, models, device=device.name)
    policies = args.policy or list(ALL_POLICIES)
    setting = Setting(args.models, args.rate, slo, device, args.duration, args.seed)
    if args.gpus:
        results = {}
        for policy in policies:
            layout = Deployment(args.gpus, args.prefill if policy == "aegaeon" else 0)
            res = run_deployment(trace, policy, layout, models, device, cost, slo)
            results[policy] = {"gpus": args.gpus, "models_per_gpu": args.models / args.gpus,
                               "metrics": res.metrics, "switches": res.switches}  # fmt: skip
    else:
        results = gpus_needed(trace, models, cost, setting, policies, args.metric)
    out = {
        "setting": {"device": device.name, "models": args.models, "rate_per_model": args.rate,
                    "slo": {"ttft_s": slo.ttft_s, "tbt_s": slo.tbt_s}, "requests": len(trace),
                    "duration_s": args.duration, "metric": args.metric, "cost_model":
                    args.profile or f"roofline {device.name}"},
        "policies": results,
    }  # fmt: skip
    print_setting(out)
    return out


def paper(args: argparse.Namespace) -> dict:
    """The paper's grid, with the headline point (80 models, λ = 0.1, paper SLOs)."""
    from tqdm import tqdm

    from aegaeon.sim.report import print_paper

    device = device_spec(args.gpu)
    scales = (1.0,) if args.quick else (1.0, 0.5, 0.3)
    settings = paper_settings(device, slo_scales=scales)
    if args.quick:
        settings = [Setting(s.models, s.rate, s.slo, s.device, s.duration / 2, s.seed,
                            s.slo_scale) for s in settings]  # fmt: skip
    points = []
    with tqdm(total=len(settings), desc="sim --paper", unit="point") as bar:
        for setting in settings:
            bar.set_postfix(models=setting.models, rate=setting.rate, slo=setting.slo_scale)
            points.append(run_setting(setting, args.policy or ALL_POLICIES))
            bar.update()
    top = next(p for p in points
               if p["models"] == 80 and p["rate_per_model"] == 0.1 and p["slo_scale"] == 1.0)  # fmt: skip
    head = headline(top)
    # The paper scores attainment by the time-fraction view; report that view's answer too.
    tf_point = run_setting(
        Setting(80, 0.1, Slo(10.0, 0.1), device, top["duration_s"]),
        ("aegaeon", "request-level", "dedicated"), metric="time_fraction_attainment",
    )  # fmt: skip
    out = {
        "setting": {"device": device.name, "cost_model": f"roofline {device.name}",
                    "model_mix": "60% 7B / 20% 9B / 20% 13B", "arrivals": "Poisson per model",
                    "lengths": "ShareGPT-like lognormal", "attainment_target": 0.9},
        "gpus_vs_dedicated": head["gpus_vs_dedicated"],
        "models_per_gpu_vs_request_level": head["models_per_gpu_vs_request_level"],
        "headline": head,
        "headline_time_fraction_view": headline(tf_point),
        "max_models_per_gpu": max(
            (v["models_per_gpu"] or 0) for p in points for k, v in p["policies"].items()
            if k == "aegaeon"
        ),
        "points": points,
    }  # fmt: skip
    print_paper(out)
    return out
