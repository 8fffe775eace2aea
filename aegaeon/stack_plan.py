"""What ``aegaeon up`` starts: its command line, and the services it derives from it (pure, no
processes: ``plan_children`` is what ``launcher.Stack`` runs and what the tests inspect)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from aegaeon.children import Child

LEASE_TTL_S = 3.0
"""--schedulers ≥ 2: a standby takes over about this long after the leader dies."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models-dir", type=Path, default=None,
                        help="models in HF layout (default: <home>/models, demo models on first run)")  # fmt: skip
    parser.add_argument("--workers", type=int, default=1, help="gpu-worker processes")
    parser.add_argument("--schedulers", type=int, default=1,
                        help="scheduler processes: one leads, the others stand by to take over")  # fmt: skip
    parser.add_argument("--roles", default="", metavar="ROLE,ROLE,…",
                        help="each worker's role (prefill, decode, both), in order; default both")  # fmt: skip
    parser.add_argument("--device", default="cpu", help="cpu or cuda (workers use cuda:0..N-1)")
    parser.add_argument("--port", type=int, default=8000, help="the gateway's HTTP port")
    parser.add_argument("--host", default="127.0.0.1", help="the gateway's bind address")
    parser.add_argument("--insecure-open", action="store_true",
                        help="let the gateway serve a non-loopback --host without API keys")  # fmt: skip
    parser.add_argument("--policy", default="aegaeon", help="scheduling policy")
    parser.add_argument("--profile", type=Path, default=None,
                        help="step-time profile for the scheduler (default: <home>/profiles/<device>.json "
                             "when `aegaeon profile` wrote one; else roofline estimates)")  # fmt: skip
    parser.add_argument(
        "--slo-ttft", type=float, default=None, help="TTFT SLO the scheduler plans for, s"
    )
    parser.add_argument(
        "--slo-tbt", type=float, default=None, help="TBT SLO the scheduler plans for, s"
    )
    parser.add_argument(
        "--max-wait", type=float, default=None,
        help="seconds a first token may wait before it goes ahead of every priority class "
             "(the scheduler's --max-wait)",
    )  # fmt: skip
    parser.add_argument("--policy-option", action="append", default=[], metavar="KEY=VALUE",
                        help="passed to the scheduler's policy (repeatable)")  # fmt: skip
    parser.add_argument("--home", type=Path, default=None, help="state dir (default $AEGAEON_HOME)")
    parser.add_argument("--arena-bytes", type=int, default=None, help="each worker's memory arena")
    parser.add_argument("--cache-bytes", type=int, default=None, help="host model cache capacity")
    parser.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL")  # fmt: skip
    parser.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for /health")  # fmt: skip


def service_argv(kind: str, *args: str) -> list[str]:
    """``python -m aegaeon.cli serve <kind> ...`` with this interpreter (works without PATH)."""
    return [sys.executable, "-m", "aegaeon.cli", "serve", kind, *args]


def profile_path(args: argparse.Namespace, home: Path) -> Path | None:
    """The scheduler's profile: ``--profile``, else ``<home>/profiles/<device>.json`` if present."""
    if args.profile is not None:
        path = Path(args.profile).expanduser().resolve()
        if not path.is_file():
            raise SystemExit(f"aegaeon up: --profile {path} is not a file")
        return path
    found = home / "profiles" / f"{args.device.split(':', 1)[0]}.json"
    return found if found.is_file() else None


def plan_children(args: argparse.Namespace, models_dir: Path, logs: Path, cache_bytes: int, profile: Path | None = None) -> list[Child]:  # fmt: skip
    """The services of the stack, in start order."""
    scheduler = ["--policy", args.policy, *(["--profile", str(profile)] if profile else [])]
    if getattr(args, "slo_ttft", None) is not None:
        scheduler += ["--slo-ttft", str(args.slo_ttft)]
    if getattr(args, "slo_tbt", None) is not None:
        scheduler += ["--slo-tbt", str(args.slo_tbt)]
    if getattr(args, "max_wait", None) is not None:
        scheduler += ["--max-wait", str(args.max_wait)]
    for option in getattr(args, "policy_option", []):
        scheduler += ["--policy-option", option]
    children = [
        Child("model-store", "model-store", service_argv(
            "model-store", "--models-dir", str(models_dir), "--cache-bytes", str(cache_bytes),
            "--store-id", "local"), logs / "model-store.log"),
    ]  # fmt: skip
    count = getattr(args, "schedulers", 1)
    for i in range(count):
        name = "scheduler" if count == 1 else f"scheduler-{i}"
        lease = ["--lease-ttl", str(LEASE_TTL_S)] if count > 1 else []  # one: nothing to elect
        argv = service_argv("scheduler", *scheduler, "--scheduler-id", name, *lease)
        children.append(Child(name, "scheduler", argv, logs / f"{name}.log"))
    for i in range(args.workers):
        device = f"cuda:{i}" if args.device == "cuda" else args.device
        extra = ["--arena-bytes", str(args.arena_bytes)] if args.arena_bytes else []
        roles = [r for r in getattr(args, "roles", "").split(",") if r]
        role = roles[i] if i < len(roles) else "both"
        argv = service_argv("worker", "--worker-id", f"worker-{i}", "--device", device, "--role", role,
                            "--store-id", "local", *extra)  # fmt: skip
        children.append(Child(f"worker-{i}", "worker", argv, logs / f"worker-{i}.log"))
    gateway = service_argv("gateway", "--host", args.host, "--port", str(args.port), "--gateway-id", "gw-0")  # fmt: skip
    if getattr(args, "insecure_open", False):
        gateway.append("--insecure-open")
    children.append(Child("gateway", "gateway", gateway, logs / "gateway.log"))
    return children
