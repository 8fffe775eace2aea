"""``aegaeon models add`` and ``aegaeon models list``: the registry from the command line.

Registering a model makes it appear as a folder in the models directory: a symlink named after the
model, pointing at the Hugging Face folder, or, for a ``.gguf`` file, a folder converted from it
(``gguf_import``). A running model-store picks it up on its next scan. ``--priority`` and ``--pin``
record the model's serving settings in the models directory's lifecycle book
(``lifecycle.record_serving``).
When this user's ``aegaeon up`` runs, both go to the models directory it serves (its connection
file says which) unless ``--models-dir`` says otherwise, and its workers' heartbeats say how large
a model they can hold: a larger one is refused here with what would fit (not at its first
request).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import msgspec

from aegaeon.capacity import largest_slot, too_large
from aegaeon.config import default_state_dir, local_bus_config, local_models_dir
from aegaeon.lifecycle import LifecycleError
from aegaeon.priority import PRIORITIES
from aegaeon.protocol import Heartbeat, ModelInfo, decode
from aegaeon.serving import pin_argument, settings_text
from aegaeon.subjects import Subjects

from .gguf_import import import_gguf, imported_from, is_gguf_file, name_from_file
from .lifecycle import LifecycleBook, record_serving
from .registry import (
    ModelError,
    RegistryScanner,
    check_name,
    check_supported,
    describe,
    missing_target,
)


def default_models_dir() -> Path:
    """The models directory of the ``aegaeon up`` this user runs here (its connection file), else
    the one it serves by default (``$AEGAEON_HOME/models``): a model added is one the stack sees."""
    return local_models_dir() or default_state_dir() / "models"


def add_arguments_for(words: tuple[str, ...], parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--models-dir", type=Path, default=None,
        help="the registry's folder (default: the one the running `aegaeon up` serves, else "
             "$AEGAEON_HOME/models, i.e. ~/.aegaeon/models)",
    )  # fmt: skip
    if words[-1] == "add":
        parser.add_argument("path", type=Path, help="a Hugging Face model folder or a .gguf file")
        parser.add_argument(
            "--name", default=None, help="the model's name (default: the folder's or file's name)"
        )
        parser.add_argument(
            "--priority", choices=PRIORITIES, default=None,
            help="its priority class against other models' work (default: as recorded, normal)",
        )  # fmt: skip
        parser.add_argument(
            "--pin", type=pin_argument, default=None, metavar="N",
            help="keep it resident on N worker instances (the aegaeon policy; 0 unpins; "
                 "default: as recorded, 0)",
        )  # fmt: skip
    else:
        parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def check_servable(folder: Path, name: str, slot_bytes: int | None) -> ModelInfo:
    """The checks a model passes to be registered: readable config and safetensors headers, an
    architecture the engine can build, and (when known) a size some worker's weight slot holds."""
    info = describe(folder, name)
    check_supported(info)
    if slot_bytes and info.weight_bytes > slot_bytes:
        raise ModelError(too_large(name, info.weight_bytes, slot_bytes))
    return info


class NameTaken(ModelError):
    """Something already stands in the models directory under the model's name."""


def taken_text(entry: Path, name: str) -> str:
    """Why ``name`` cannot be registered: ``entry`` stands in its place (a link whose target is
    gone says how to remove it: nothing else would)."""
    target = missing_target(entry)
    if target is not None:
        return (
            f"the name {name!r} is taken by a link whose target is missing ({entry} → {target}): "
            f"remove it (`aegaeon models remove {name}` while the stack runs, else `rm {entry}`) "
            "or pick --name"
        )
    return f"a model named {name!r} is already registered ({entry}); pick --name"


def _refuse_taken(entry: Path, name: str) -> None:
    if entry.exists() or entry.is_symlink():
        raise NameTaken(taken_text(entry, name))


def model_name(path: Path, name: str | None = None) -> str:
    """The name ``path`` (as given) registers as: ``name``, else the GGUF file's stem as given (a
    hub cache's x.gguf is a link to a blob named by its hash) or the folder's own name once
    links are resolved (made a valid name). Raises ModelError for an invalid name."""
    if name:
        return check_name(name)
    return check_name(name_from_file(path) if is_gguf_file(path) else path.resolve().name)


def register(
    path: Path, models_dir: Path, name: str | None = None, slot_bytes: int | None = None
) -> Path:
    """Validate ``path`` and add it to ``models_dir`` as ``name``: a Hugging Face folder is linked,
    a ``.gguf`` file is converted into a folder there. Adding it again is harmless (the same
    folder, or the same unchanged .gguf file: nothing is converted again). Raises ModelError.
    ``slot_bytes``: the largest weight slot of the running workers, when known (a model larger
    than every slot is refused now rather than at its first request)."""
    # A .gguf is known by the name given: a hub cache's snapshots/<rev>/x.gguf is a link to a
    # blob named by its hash.
    given = path.expanduser().absolute()
    path = given.resolve()
    if is_gguf_file(given):
        gguf_name = model_name(given, name)
        folder = models_dir / gguf_name
        if imported_from(folder, path):  # already imported from this very file: nothing to do
            check_servable(folder, gguf_name, slot_bytes)
            return folder
        _refuse_taken(folder, gguf_name)
        return import_gguf(path, folder, lambda out: check_servable(out, gguf_name, slot_bytes))
    if not path.is_dir():
        raise ModelError(f"{path}: not a folder")
    name = model_name(path, name)
    check_servable(path, name, slot_bytes)  # config and every safetensors header must be readable
    link = models_dir / name
    if link.exists() and link.resolve() == path:
        return link  # already registered (linked, or the folder itself): adding again is harmless
    _refuse_taken(link, name)
    models_dir.mkdir(parents=True, exist_ok=True)
    link.symlink_to(path, target_is_directory=True)
    return link


def _size(nbytes: int) -> str:
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def print_registry(models_dir: Path, as_json: bool) -> None:
    """Every model of ``models_dir`` with its size and serving settings, and every folder
    refused, with why."""
    registry = RegistryScanner(models_dir).scan()
    book = LifecycleBook(models_dir)
    if as_json:
        models = [msgspec.to_builtins(m) | {"priority": book.priority(m.name), "pin": book.pin(m.name)}
                  for m in registry.models.values()]  # fmt: skip
        print(json.dumps({"models": models, "problems": registry.problems}, indent=2))
        return
    header = f"{'NAME':<24} {'ARCHITECTURE':<24} {'PARAMS':>10} {'WEIGHTS':>11} {'CONTEXT':>8} {'DTYPE':<9} {'PRIORITY':<8} PIN"  # fmt: skip
    print(header)
    for m in registry.models.values():
        params = f"{m.num_parameters / 1e6:.1f}M"
        print(f"{m.name:<24} {m.architecture:<24} {params:>10} {_size(m.weight_bytes):>11} {m.context_length:>8} {m.dtype:<9} {book.priority(m.name):<8} {book.pin(m.name)}")  # fmt: skip
    for name, why in registry.problems.items():
        print(f"{name:<24} NOT SERVABLE: {why}")
    if not registry.models and not registry.problems:
        print(f"(no models in {models_dir}; add one with `aegaeon models add PATH`)")


HEARTBEAT_WAIT_S = 2.5
"""How long ``models add`` listens for the running workers' heartbeats (they beat every second)."""


def running_workers_slot() -> int | None:
    """The largest weight slot among the workers of the ``aegaeon up`` this user runs here
    (their heartbeats), or None when there is no such stack or no worker answers."""
    config = local_bus_config()
    if config is None:
        return None

    async def listen() -> int | None:
        import nats

        slots: list[int] = []
        try:
            nc = await nats.connect(config.nats_url, user=config.nats_user,
                                    password=config.nats_password,
                                    allow_reconnect=False, connect_timeout=2)  # fmt: skip
        except Exception:  # a stale file of a stack that is gone
            return None

        async def on_beat(msg: Any) -> None:
            slots.append(largest_slot(decode(msg.data, Heartbeat)))

        await nc.subscribe(Subjects(config.prefix).heartbeat, cb=on_beat)
        await asyncio.sleep(HEARTBEAT_WAIT_S)
        await nc.close()
        return max(slots) if slots else None

    return asyncio.run(listen())


def main(args: argparse.Namespace) -> int:
    models_dir = (args.models_dir or default_models_dir()).expanduser()
    if args.command[-1] == "list":
        print_registry(models_dir, args.json)
        return 0
    before = set(models_dir.iterdir()) if models_dir.is_dir() else set()
    try:
        link = register(args.path, models_dir, args.name, running_workers_slot())
        if link not in before:  # a new entry: a mark left under its name speaks of another model
            LifecycleBook(models_dir).discard(link.name)
        if args.priority is not None or args.pin is not None:
            record_serving(models_dir, link.name, args.priority, args.pin)
    except ModelError as exc:
        print(f"aegaeon models add: refused: {exc}", file=sys.stderr)
        return 1
    except LifecycleError as exc:
        print(f"aegaeon models add: registered, but its serving settings were not recorded: {exc.message}", file=sys.stderr)  # fmt: skip
        return 1
    settings = settings_text(args.priority, args.pin)
    recorded = f" ({settings})" if settings else ""
    done = "registered" if link not in before else "already registered"
    print(f"{done} {link.name} → {link.resolve()} in {models_dir}{recorded}")
    return 0
