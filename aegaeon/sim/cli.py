"""``aegaeon sim``: how many GPUs a trace needs at given SLOs, per policy, in simulation.

    aegaeon sim --gpu H800 --models 40 --rate 0.1 --json out.json
    aegaeon sim --gpus 8 --policy aegaeon          # attainment at a fixed GPU count
    aegaeon sim --paper --json paper.json          # the paper's end-to-end study (sim/paper.py)
    aegaeon sim --paper --quick --json q.json      # the same, SLO ×1 and 3 model counts a rate
    aegaeon sim --nodes 32 --models 500 --duration 120 --json fleet.json
                                                   # a 256-GPU fleet: GPUs needed per policy
                                                   # with and without locality (sim/fleet.py)

Every policy is offered the same layouts at each GPU count (``--prefill`` pins one); the layout
behind each result is printed and written with it.

With ``--nodes`` (or ``--locality``) the GPUs sit on nodes (``--gpus-per-node``) whose host
memory caches weights (``--host-cache-gb``, LRU, warm at the start) and fetches the others over
the network (``--network-gbs``) before the host → device copy; the search stops at the fleet's
size, and each policy runs with the locality hint and without it (``--locality``).

The cost model is a roofline of ``--gpu`` or, with ``--profile``, the fitted profiles that
``aegaeon profile`` wrote. The trace is Poisson (or Gamma with ``--cv``) per model with
ShareGPT-like lengths; ``--sharegpt FILE`` samples real lengths instead.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from aegaeon.scheduler.estimators import Estimator, load_estimator
from aegaeon.scheduler.policies.base import ModelSpec, Slo
from aegaeon.sim.engine import SimResult
from aegaeon.sim.hardware import DEVICES, DeviceSpec, device_spec, paper_models
from aegaeon.sim.layout import has_roles
from aegaeon.sim.nodes import NodeSetup
from aegaeon.sim.run import POLICIES, Deployment, best_at, run_deployment
from aegaeon.sim.study import ALL_POLICIES, VIEWS, Setting, gpus_needed
from aegaeon.workload import SHAREGPT, TraceRequest, generate_trace, load_sharegpt


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``aegaeon sim``."""
    parser.add_argument("--gpu", default="H800", choices=sorted(DEVICES), help="roofline device")
    parser.add_argument("--profile", help="fitted profile JSON (aegaeon profile) instead")
    parser.add_argument("--models", type=int, default=40, help="number of models (paper mix)")
    parser.add_argument("--rate", type=float, default=0.1, help="requests/s per model")
    parser.add_argument("--policy", action="append", choices=sorted(POLICIES), help="repeatable")
    parser.add_argument("--slo-ttft", type=float, default=10.0, help="seconds")
    parser.add_argument("--slo-tbt", type=float, default=0.1, help="seconds")
    parser.add_argument("--duration", type=float, default=300.0, help="simulated trace seconds")
    parser.add_argument("--gpus", type=int, help="simulate this many GPUs instead of searching")
    parser.add_argument("--prefill", type=int, help="pin prefill instances (--gpus; policies "
                        "with roles), else every offered layout is tried")  # fmt: skip
    parser.add_argument("--popularity", choices=("uniform", "zipf"), default="uniform")
    parser.add_argument("--cv", type=float, default=1.0, help="arrival CV (>1: bursty Gamma)")
    parser.add_argument("--sharegpt", help="ShareGPT JSON to sample lengths from")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--metric", default="attainment", choices=VIEWS)
    parser.add_argument("--nodes", type=int, help="a fleet of this many nodes with host weight "
                        "caches; the GPU search stops at nodes × --gpus-per-node")  # fmt: skip
    parser.add_argument("--gpus-per-node", type=int, help="default: the --gpu server's (8)")
    parser.add_argument("--host-cache-gb", type=float, help="weights each node's host memory "
                        "caches, GB (default: half the server's DRAM, 1 TiB)")  # fmt: skip
    parser.add_argument("--network-gbs", type=float, help="GB/s a node fetches weights at from "
                        "the model store or a peer (default: 80%% of a 200 Gb/s NIC, 20)")  # fmt: skip
    parser.add_argument("--locality", choices=("on", "off", "both"), help="policies told what "
                        "each node caches, or not (the sim charges fetches either way), or "
                        "each policy run both ways (the default with --nodes)")  # fmt: skip
    parser.add_argument("--jobs", type=int, default=1, help="--nodes: searches run at once, "
                        "each in its own process (one a core at most)")  # fmt: skip
    parser.add_argument("--paper", action="store_true", help="the paper's end-to-end study")
    parser.add_argument("--quick", action="store_true", help="--paper: SLO ×1, 3 counts a rate")
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
    if getattr(args, "nodes", None) or getattr(args, "locality", None):
        from aegaeon.sim.fleet import fleet_study

        return fleet_study(args, trace, models, cost, setting, policies)
    if args.gpus:
        results = {}
        for policy in policies:
            res, layout = _at_gpus(args, trace, policy, models, device, cost, slo)
            results[policy] = {"gpus": args.gpus, "models_per_gpu": args.models / args.gpus,
                               "layout": layout.to_json(), "metrics": res.metrics,
                               "switches": res.switches}  # fmt: skip
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


def _at_gpus(
    args: argparse.Namespace, trace: list[TraceRequest], policy: str,
    models: dict[str, ModelSpec], device: DeviceSpec, cost: Estimator, slo: Slo,
    nodes: NodeSetup | None = None,
) -> tuple[SimResult, Deployment]:  # fmt: skip
    """The run at ``--gpus``: the pinned layout, or the best of those offered."""
    if args.prefill is not None:
        layout = Deployment(args.gpus, args.prefill if has_roles(policy) else 0)
        return run_deployment(trace, policy, layout, models, device, cost, slo, nodes), layout

    def run(deployment: Deployment) -> SimResult:
        return run_deployment(trace, policy, deployment, models, device, cost, slo, nodes)

    layout, res = best_at(args.gpus, policy, run, args.metric)
    return res, layout


def paper(args: argparse.Namespace) -> dict:
    """The paper's end-to-end study (:mod:`aegaeon.sim.paper`)."""
    from tqdm import tqdm

    from aegaeon.sim.paper import FULL, QUICK, paper_study
    from aegaeon.sim.report import print_paper

    device = device_spec(args.gpu)
    grid = QUICK if args.quick else FULL
    policies = [p for p in (args.policy or ALL_POLICIES) if p in POLICIES]
    with tqdm(desc="sim --paper", unit="run") as bar:
        out = paper_study(device, grid, policies, on_run=bar.update)
    print_paper(out)
    return out
