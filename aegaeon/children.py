"""Service processes of ``aegaeon up``: each in its own process group, logged to a file, and
stopped together with everything it started.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO


def die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if the launcher itself is killed (no orphans).
    Linux sends it when the *thread* that started the child ends, so start such children from
    the main thread."""
    with contextlib.suppress(OSError):  # not Linux: Ctrl-C and SIGTERM still stop everything
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def parent_death_hook() -> Callable[[], None] | None:
    """``preexec_fn`` for a child that must not outlive this process: die_with_parent when
    called from the main thread; None from any other thread, whose end (a thread pool's worker
    retiring) would kill the child long before this process exits."""
    return die_with_parent if threading.current_thread() is threading.main_thread() else None


def exit_on_sigterm() -> None:
    """In a one-shot command (a benchmark): SIGTERM unwinds like Ctrl-C, so ``with`` blocks stop
    the stacks it started and remove its temporary folders (Python's default just dies)."""

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


@dataclass
class Child:
    """One supervised service: how to start it, and the process when it runs."""

    name: str
    kind: str  # gateway, worker, scheduler or model-store: sets the stop order
    argv: list[str]
    log_path: Path
    process: subprocess.Popen | None = None
    log: IO[bytes] | None = field(default=None, repr=False)

    def start(self, env: dict[str, str]) -> None:
        self.log = self.log_path.open("ab")
        self.log.write(f"\n=== {time.strftime('%F %T')} starting {' '.join(self.argv)}\n".encode())
        self.log.flush()
        self.process = subprocess.Popen(
            self.argv, env=env, stdin=subprocess.DEVNULL, stdout=self.log,
            stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent,
        )  # fmt: skip

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else -1

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def signal_group(self, sig: int) -> None:
        """Signal the child's whole process group (anything it started goes too)."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)

    def wait_group_gone(self, timeout: float = 3.0) -> None:
        """Wait until no process of the child's group is left (SIGKILL lands asynchronously)."""
        deadline = time.monotonic() + timeout
        while self.process is not None and time.monotonic() < deadline:
            try:
                os.killpg(self.process.pid, 0)
            except (ProcessLookupError, PermissionError):
                return
            time.sleep(0.02)

    def close_log(self) -> None:
        if self.log is not None:
            self.log.close()
            self.log = None


def remove_stale_shm(parent: Path) -> list[Path]:
    """Remove ``aegaeon-up-<pid>`` folders of launchers that no longer run (killed with SIGKILL,
    so they could not clean up). Returns what was removed."""
    removed = []
    for folder in parent.glob("aegaeon-up-*"):
        pid = folder.name.rsplit("-", 1)[-1]
        if _ours(folder) and pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def pid_alive(pid: int) -> bool:
    """True while a process with this id exists (an id no process can have is not alive)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError, ValueError):
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _ours(path: Path) -> bool:
    """A real folder (not a symlink) of this user; False when it is gone."""
    try:
        return path.lstat().st_uid == os.getuid() and not path.is_symlink()
    except OSError:
        return False


def make_private_dir(path: Path) -> None:
    """Create ``path`` as a fresh 0700 folder of this user. One already there is reused only when
    it is ours (then emptied): another user's, or a symlink, is refused, since it could hand us
    files to read or swap weights under us."""
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        if not _ours(path):
            raise RuntimeError(
                f"{path} exists and is not this user's folder; refusing to use it"
            ) from None
        shutil.rmtree(path)
        path.mkdir(mode=0o700)
    path.chmod(0o700)


def wait_until(child: Child, deadline: float) -> None:
    """Wait for the child to exit, at most until ``deadline`` (monotonic clock)."""
    if child.process is None:
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.process.wait(max(0.0, deadline - time.monotonic()))
