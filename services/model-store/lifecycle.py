"""The lifecycle book: the state of each model the admin API deployed, drained or saw fail, and
each model's serving settings (``aegaeon.serving``: priority class, pin), kept in the models
directory beside the folders it speaks of; and the removal of a model's folder.

A model found in the models directory without a mark is ``ready``, ``normal`` and unpinned (as
before the admin API); setting one of its settings gives it a ``ready`` mark. The marks are one
small JSON file, ``<models-dir>/.aegaeon-lifecycle.json`` (the registry skips dot-names), changed
under a lock from the file read afresh and written through a temp file and a rename::

    {"my-model": {"state": "draining", "reason": "", "origin": "link", "priority": "high",
                  "pin": 2, "keep_alive_s": 600.0}}

Why there and not in Redis: the models directory already is the registry's durable truth (a
folder there is a registered model), the model-store is the only writer of both and has no Redis
connection, and stores that share one directory (one per node) then agree on every state; a
restarted store keeps a drain and the settings. A removed model's mark goes with its folder. A
folder deleted by hand leaves its mark, which then reads as absent (a deploy or ``models add``
of the name starts anew), but a folder copied in by hand under that name inherits it: its
state and settings, not recorded per folder. Moves follow ``aegaeon.lifecycle``; the
book adds only the bookkeeping. ``record_serving`` sets the settings without a running store.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

from aegaeon.lifecycle import Action, LifecycleError, next_state
from aegaeon.priority import DEFAULT_PRIORITY, PRIORITIES, Priority, check_priority
from aegaeon.protocol import ModelState
from aegaeon.serving import check_keep_alive, check_pin

from .registry import NAME_PATTERN

log = logging.getLogger(__name__)

MARKS_FILE = ".aegaeon-lifecycle.json"
LOCK_FILE = ".aegaeon-lifecycle.lock"
"""Held while the marks are read, changed and written: stores sharing the directory and
``aegaeon models add`` write them too, and a change made from a stale copy would undo theirs."""

Origin = Literal["link", "import"]
"""How the admin API registered a model: a link to a folder, or a folder converted from GGUF
(which the store made, so it may delete it)."""


@dataclass(frozen=True)
class Mark:
    """One model's recorded state (``reason``: why it failed), how it was registered, and its
    serving settings."""

    state: ModelState
    reason: str = ""
    origin: Origin = "link"
    priority: Priority = DEFAULT_PRIORITY
    pin: int = 0
    keep_alive_s: float = 0.0


class LifecycleBook:
    """The marks of one models directory. Used from the store's event loop only."""

    def __init__(self, models_dir: str | Path) -> None:
        self.path = Path(models_dir) / MARKS_FILE
        self._marks: dict[str, Mark] = {}
        self._stamp: tuple[int, int] | None = None  # (inode, mtime): each write is a new file
        self.reload_if_changed()

    def state(self, name: str, registered: bool) -> ModelState | None:
        """The state of ``name``: its mark, else ``ready`` when its folder is registered; None
        (absent) when it is not (a mark whose folder went by hand is stale)."""
        mark = self._marks.get(name)
        if mark is not None and (registered or mark.state == "loading"):
            return mark.state
        return "ready" if registered else None

    def reason(self, name: str) -> str:
        mark = self._marks.get(name)
        return mark.reason if mark is not None else ""

    def origin(self, name: str) -> Origin | None:
        """How the admin API registered ``name`` (None: found in the directory)."""
        mark = self._marks.get(name)
        return mark.origin if mark is not None else None

    def priority(self, name: str) -> Priority:
        """The class of ``name`` (``normal`` when none was set)."""
        mark = self._marks.get(name)
        return mark.priority if mark is not None else DEFAULT_PRIORITY

    def pin(self, name: str) -> int:
        """The instances that keep ``name`` resident (0, not pinned, when none was set)."""
        mark = self._marks.get(name)
        return mark.pin if mark is not None else 0

    def keep_alive_s(self, name: str) -> float:
        """The idle time after which ``name`` is evicted (0, never, when none was set)."""
        mark = self._marks.get(name)
        return mark.keep_alive_s if mark is not None else 0.0

    def loading(self) -> list[str]:
        """Models whose load has not ended (a store that restarts resumes them)."""
        return [name for name, mark in self._marks.items() if mark.state == "loading"]

    def move(
        self, name: str, registered: bool, action: Action, reason: str = "",
        origin: Origin | None = None, priority: str | None = None, pin: int | None = None,
    ) -> ModelState | None:  # fmt: skip
        """Apply ``action`` to ``name`` and record it; returns the new state (None: removed).
        ``origin`` and the serving settings ``priority`` and ``pin`` (a deploy's) default to
        those recorded. Raises LifecycleError: a move its state does not allow (4xx), a setting
        out of range (400), or a file that cannot be written (500); nothing changed."""
        with self._locked():
            current = self.state(name, registered)
            target = next_state(name, current, action)
            settings = _checked_settings(name, priority, pin)
            marks = dict(self._marks)
            if target is None:
                marks.pop(name, None)
            else:
                # The mark of an absent model (its folder went by hand) is stale: a deploy
                # starts anew.
                old = (marks.get(name) if current is not None else None) or Mark(target)
                marks[name] = replace(
                    old, state=target, reason=reason, origin=origin or old.origin, **settings
                )
            self._write(marks)
        return target

    def set_serving(
        self, name: str, registered: bool, priority: str | None = None, pin: int | None = None,
        keep_alive_s: float | None = None,
    ) -> None:  # fmt: skip
        """Record the serving settings given of ``name`` (None: leave it as it is), whatever its
        state. Raises LifecycleError: 400 an unknown class, a pin or keep-alive out of range or
        nothing given, 404 an absent model, 500 a file that cannot be written; nothing changed."""
        settings = _checked_settings(name, priority, pin, keep_alive_s)
        if not settings:
            raise LifecycleError(400, f"Nothing to set for '{name}': give a priority class, a pin count or a keep-alive.")  # fmt: skip
        if not registered:
            raise LifecycleError(404, f"The model '{name}' is not registered.")
        with self._locked():
            old = self._marks.get(name) or Mark("ready")  # unmarked: as found in the directory
            self._write({**self._marks, name: replace(old, **settings)})

    def discard(self, name: str) -> None:
        """Forget ``name``'s mark (a deploy that was refused after its mark was made)."""
        with self._locked():
            if name in self._marks:
                self._write({k: v for k, v in self._marks.items() if k != name})

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold :data:`LOCK_FILE` and read the marks afresh for a read-modify-write (held for
        the few milliseconds of a small file's write)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock = open(self.path.with_name(LOCK_FILE), "a")  # noqa: SIM115 (held below)
        except OSError as exc:
            raise self._unwritable(exc) from None
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            # Read whatever its stamp says: another write may fall within one mtime tick.
            self._marks, self._stamp = _read(self.path), self._current_stamp()
            yield

    def _unwritable(self, exc: OSError) -> LifecycleError:
        return LifecycleError(
            500, f"The model-store cannot record the model's state in {self.path}: {exc}"
        )

    def reload_if_changed(self) -> None:
        """Read the file again when another store (or a restart) changed it."""
        stamp = self._current_stamp()
        if stamp == self._stamp:
            return
        self._marks, self._stamp = _read(self.path), stamp

    def _current_stamp(self) -> tuple[int, int] | None:
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return stat.st_ino, stat.st_mtime_ns

    def _write(self, marks: dict[str, Mark]) -> None:
        text = json.dumps({name: asdict(mark) for name, mark in sorted(marks.items())}, indent=2)
        temp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temp.write_text(text + "\n")
            os.replace(temp, self.path)
            self._stamp = self._current_stamp()
        except OSError as exc:
            temp.unlink(missing_ok=True)
            raise self._unwritable(exc) from None
        self._marks = marks


def record_serving(
    models_dir: str | Path, name: str, priority: str | None = None, pin: int | None = None,
    keep_alive_s: float | None = None,
) -> None:  # fmt: skip
    """Set the serving settings given of the model ``name`` of ``models_dir`` without a running
    store (no bus): ``aegaeon models add --priority --pin``, and benchmarks that write their own
    models directory before starting a stack. A store already running there reads them at its
    next scan (within a second) but announces nothing; a running system's settings are set
    through the admin API. Raises LifecycleError: 404 no such model folder, 400 a setting out of
    range or none given, 500 an unwritable file."""
    registered = NAME_PATTERN.match(name) is not None and (Path(models_dir) / name).is_dir()
    LifecycleBook(models_dir).set_serving(name, registered, priority, pin, keep_alive_s)


def _checked_settings(
    name: str, priority: str | None, pin: int | None, keep_alive_s: float | None = None
) -> dict[str, Any]:
    """The serving settings given (not None), checked: the fields of a Mark to replace."""
    settings: dict[str, Any] = {}
    try:
        if priority is not None:
            settings["priority"] = check_priority(priority)
        if pin is not None:
            settings["pin"] = check_pin(pin)
        if keep_alive_s is not None:
            settings["keep_alive_s"] = check_keep_alive(keep_alive_s)
    except ValueError as exc:
        raise LifecycleError(400, f"Invalid serving setting for '{name}': {exc}.") from None
    return settings


def _read(path: Path) -> dict[str, Mark]:
    """The marks of a file; a missing file is none, an unreadable one is logged and ignored
    (every model then reads as ready: what the directory alone says)."""
    try:
        data = json.loads(path.read_text())
        return {name: _mark(path, name, entry) for name, entry in data.items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        log.error("%s unreadable (%s): every model in it reads as ready", path, exc)
        return {}


def _mark(path: Path, name: str, entry: dict[str, Any]) -> Mark:
    # One bad setting (a hand edit) costs only that setting; entries older than a setting lack it.
    priority = entry.get("priority", DEFAULT_PRIORITY)
    if priority not in PRIORITIES:
        log.error("%s: %s has priority %r, not one of %s: reads as %s", path, name, priority,
                  PRIORITIES, DEFAULT_PRIORITY)  # fmt: skip
        priority = DEFAULT_PRIORITY
    pin = entry.get("pin", 0)
    try:
        check_pin(pin)
    except ValueError as exc:
        log.error("%s: %s: %s: reads as 0 (not pinned)", path, name, exc)
        pin = 0
    keep_alive_s = entry.get("keep_alive_s", 0.0)
    try:
        keep_alive_s = check_keep_alive(keep_alive_s)
    except ValueError as exc:
        log.error("%s: %s: %s: reads as 0 (never evicted for idling)", path, name, exc)
        keep_alive_s = 0.0
    return Mark(entry["state"], entry.get("reason", ""), entry.get("origin", "link"), priority, pin, keep_alive_s)  # fmt: skip


def remove_entry(models_dir: Path, name: str, origin: Origin | None) -> str:
    """Take ``name`` out of the models directory; returns what became of it, in words.

    A link goes (its target is untouched); a folder the store converted from GGUF is deleted; any
    other folder (copied in by hand, written by ``models create-demo`` or ``models add x.gguf``)
    is renamed to a hidden ``.removed-NAME-<time>`` beside it: out of the registry, bytes kept
    (the store never deletes what it did not make)."""
    entry = models_dir / name
    if entry.is_symlink():
        target = os.readlink(entry)
        untouched = "is untouched" if entry.exists() else "was already gone"
        entry.unlink()
        return f"removed the link {entry} (its target {target} {untouched})"
    if not entry.exists():
        return f"{entry} was already gone"
    if origin == "import":
        shutil.rmtree(entry)
        return f"deleted {entry}, which the model-store converted from GGUF"
    hidden = models_dir / f".removed-{name}-{int(time.time())}"
    entry.rename(hidden)
    return f"kept its folder as {hidden} (not made by the model-store: delete it when done)"
