"""The ``aegaeon`` command. Each subcommand lives in its own module, imported only when run,
so ``aegaeon --help`` is instant and ``aegaeon up`` does not pay for torch in the parent.

A command module provides ``add_arguments(parser)`` and ``main(args) -> int | None``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("up",): ("aegaeon.launcher", "run the whole system on this machine (embedded NATS and Redis)"),
    ("serve", "gateway"): ("aegaeon.gateway.main", "run one gateway (HTTP API)"),
    ("serve", "scheduler"): ("aegaeon.scheduler.main", "run the scheduler"),
    ("serve", "worker"): ("aegaeon.gpu_worker.main", "run one gpu-worker"),
    ("serve", "model-store"): ("aegaeon.model_store.main", "run the model-store"),
    ("models", "create-demo"): (
        "aegaeon.model_store.demo",
        "write small random-weight demo models",
    ),
    ("models", "add"): ("aegaeon.model_store.cli", "register a model folder"),
    ("models", "list"): ("aegaeon.model_store.cli", "list registered models"),
    ("models", "deploy"): ("aegaeon.model_admin", "deploy a model into the running system"),
    ("models", "drain"): ("aegaeon.model_admin", "stop a model taking requests (they finish)"),
    ("models", "remove"): ("aegaeon.model_admin", "remove a drained model from the system"),
    ("models", "priority"): ("aegaeon.model_admin", "set a model's priority class"),
    ("models", "pin"): ("aegaeon.model_admin", "keep a model resident on N worker instances"),
    ("models", "keep-alive"): ("aegaeon.model_admin", "evict a model once idle this long"),
    ("bench", "engine"): ("aegaeon.gpu_worker.bench", "benchmark switching, decode and KV swap"),
    ("bench", "stack"): ("aegaeon.bench.stack", "benchmark the gateway + NATS path"),
    ("bench", "load"): (
        "aegaeon.bench.load",
        "many concurrent streaming clients: none may be lost",
    ),
    ("bench", "serve"): ("aegaeon.bench.serve", "replay a trace against the stack, per policy"),
    ("sim",): ("aegaeon.sim.cli", "simulate a trace: GPUs needed per policy"),
    ("profile",): ("aegaeon.scheduler.profile", "measure the engine and fit step-time models"),
    ("top",): ("aegaeon.top", "live view of workers, queues and latencies"),
}


def _usage() -> str:
    lines = ["usage: aegaeon COMMAND [options]", "", "commands:"]
    for words, (_, help_text) in COMMANDS.items():
        lines.append(f"  {' '.join(words):<22} {help_text}")
    lines.append("")
    lines.append("Run `aegaeon COMMAND --help` for a command's options.")
    return "\n".join(lines)


def _find(argv: list[str]) -> tuple[tuple[str, ...], list[str]] | None:
    for length in (2, 1):
        words = tuple(argv[:length])
        if words in COMMANDS:
            return words, argv[length:]
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``aegaeon`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    found = _find(argv)
    if found is None:
        print(_usage(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    words, rest = found
    module_name, help_text = COMMANDS[words]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog="aegaeon " + " ".join(words), description=help_text)
    if hasattr(module, "add_arguments_for"):
        module.add_arguments_for(words, parser)  # one module serving several commands
    else:
        module.add_arguments(parser)
    args = parser.parse_args(rest)
    args.command = words
    result = module.main(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
