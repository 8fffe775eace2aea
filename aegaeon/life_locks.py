"""A process' claim on a file or a folder for its whole life: an exclusive ``flock`` it holds,
which the kernel drops when the process dies, however it dies. Sweeps use it to tell what a live
process still uses from what a killed one left behind (host KV pools, GGUF imports' staging
folders)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


def claim(path: Path) -> int:
    """Lock ``path`` (a file or a folder) for this process; the returned descriptor holds the
    lock until it is closed."""
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def abandoned(path: Path) -> bool:
    """Whether ``path`` exists and no process holds its claim."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True
