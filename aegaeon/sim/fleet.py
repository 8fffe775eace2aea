"""``aegaeon sim --nodes N``: GPUs needed per policy on a fleet of nodes, with and without
locality.

The GPUs sit on nodes (:mod:`aegaeon.sim.nodes`): each node caches weights in host memory and
fetches the others over its network link before a switch's host → device copy. Every policy
runs twice on the same trace and the same warm caches: with the locality hint (placement sees
what each node caches and weighs the fetch) and without it (placement as on one node; the
fetches are charged all the same). The GPU search is the bisection of :mod:`aegaeon.sim.run`
over [1, min(models, nodes × GPUs a node)], so its runs are few (≈ log2 of the fleet, each
layout offered at a probe); each result says how many runs it took and their wall time.

    aegaeon sim --nodes 32 --models 500 --rate 0.1 --duration 120 --json fleet.json
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import replace
from functools import partial

from aegaeon.scheduler.estimators import Estimator
from aegaeon.scheduler.policies.base import ModelSpec
from aegaeon.sim.hardware import node_spec
from aegaeon.sim.nodes import NodeSetup
from aegaeon.sim.study import Setting, gpus_needed
from aegaeon.workload import TraceRequest

MODES = {"on": (True,), "off": (False,), "both": (True, False)}


def mode_name(locality: bool) -> str:
    return "locality" if locality else "no_locality"


def node_setup(args: argparse.Namespace) -> NodeSetup:
    """The nodes the options describe; what they leave out, the ``--gpu`` server's."""
    spec = node_spec(args.gpu)
    cache_gb, net_gbs = getattr(args, "host_cache_gb", None), getattr(args, "network_gbs", None)
    return NodeSetup(
        getattr(args, "gpus_per_node", None) or spec.gpus,
        int(cache_gb * 1e9) if cache_gb is not None else spec.host_cache_bytes,
        net_gbs * 1e9 if net_gbs is not None else spec.fetch_bytes_per_s,
    )


def fleet_study(
    args: argparse.Namespace, trace: list[TraceRequest], models: dict[str, ModelSpec],
    cost: Estimator, setting: Setting, policies: Sequence[str],
) -> dict:  # fmt: skip
    """Each policy with and without locality: its GPU search on the fleet, or its run at
    ``--gpus``; ``--jobs N`` runs N of them at once in worker processes. Prints a line per
    result as it comes, then the table."""
    from aegaeon.sim.report import print_fleet

    setup = node_setup(args)
    fleet_gpus = args.nodes * setup.gpus_per_node if args.nodes else None
    if args.gpus and fleet_gpus and args.gpus > fleet_gpus:
        raise SystemExit(f"--gpus {args.gpus} does not fit {args.nodes} nodes")
    modes = MODES[getattr(args, "locality", None) or "both"]
    tasks = [(policy, replace(setup, locality=m)) for policy in policies for m in modes]
    study = partial(_one, args, trace, models, cost, setting, fleet_gpus)
    results: dict[str, dict] = {policy: {} for policy in policies}
    jobs = max(1, min(getattr(args, "jobs", 1) or 1, len(tasks)))
    with ProcessPoolExecutor(jobs) if jobs > 1 else nullcontext() as pool:
        rows = pool.map(study, tasks) if pool is not None else map(study, tasks)
        for (policy, nodes), row in zip(tasks, rows, strict=True):
            results[policy][mode_name(nodes.locality)] = row
            print(f"{policy} {mode_name(nodes.locality)}: {row['gpus']} GPUs "
                  f"({row.get('runs', 1)} runs, {row['wall_s']:.0f} s)", flush=True)  # fmt: skip
    out = {
        "setting": {"device": setting.device.name, "models": args.models,
                    "rate_per_model": args.rate, "slo": {"ttft_s": setting.slo.ttft_s,
                    "tbt_s": setting.slo.tbt_s}, "requests": len(trace),
                    "duration_s": args.duration, "metric": args.metric,
                    "cost_model": args.profile or f"roofline {setting.device.name}",
                    "nodes": {"count": args.nodes, "fleet_gpus": fleet_gpus, **setup.to_json(),
                              "warm": "models dealt round-robin over the nodes until full"},
                    "locality": [mode_name(m) for m in modes], "jobs": jobs},
        "policies": results,
    }  # fmt: skip
    print_fleet(out)
    return out


def _one(
    args: argparse.Namespace, trace: list[TraceRequest], models: dict[str, ModelSpec],
    cost: Estimator, setting: Setting, fleet_gpus: int | None, task: tuple[str, NodeSetup],
) -> dict:  # fmt: skip
    """One policy in one locality mode: its GPU search, or its run at ``--gpus``."""
    from aegaeon.sim.cli import _at_gpus

    policy, nodes = task
    started = time.monotonic()
    if not args.gpus:
        row = gpus_needed(trace, models, cost, setting, [policy], args.metric, nodes=nodes,
                          fleet_gpus=fleet_gpus)[policy]  # fmt: skip
        return {**row, "wall_s": row["search_wall_s"]}
    res, layout = _at_gpus(args, trace, policy, models, setting.device, cost, setting.slo, nodes)
    return {"gpus": args.gpus, "models_per_gpu": args.models / args.gpus,
            "layout": layout.to_json(), "metrics": res.metrics, "switches": res.switches,
            "fetches": res.fetches, "fetch_wait_s": round(res.fetch_wait_s, 1),
            "wall_s": round(time.monotonic() - started, 1)}  # fmt: skip
