"""The host KV pool: one shared-memory file that preempted requests' KV is swapped into.

Living in shared memory (``/dev/shm``) lets another process on the node (a decode instance)
map the same bytes, which is how KV moves from a prefill worker to a decode worker. On CUDA
the mapping is page-locked so copies to and from the device run at link speed.

Page-locking goes through torch's ``cudaHostRegister`` binding, which returns CUDA's error code
but leaves it as the thread's "last error": the next kernel launch check would then report it as
its own failure. Every failed (un)register here clears it at once and says what failed.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import uuid
import warnings
import weakref
from pathlib import Path

import torch
from aegaeon.gpu_worker.kv_cache import ExtentAllocator

from aegaeon.life_locks import abandoned, claim

log = logging.getLogger(__name__)

HOST_REGISTER_PORTABLE = 1  # pinned for every CUDA context, whichever thread registers it
HOST_REGISTER_READ_ONLY = 8  # cudaHostRegisterReadOnly: the device only reads the pinned pages


def map_file(path: Path, nbytes: int, shared: bool = True) -> torch.Tensor:
    """A uint8 tensor over a file's bytes (mmap; nothing is read until touched)."""
    return torch.from_file(str(path), shared=shared, size=nbytes, dtype=torch.uint8)


def map_file_read_only(path: Path, nbytes: int) -> torch.Tensor:
    """A uint8 tensor over a file's first ``nbytes``, mapped shared and read-only.

    Shared, so pinning it does not copy every page (a private mapping is copied on a writable
    pin); read-only, so the kernel allows a long-term pin of a file outside tmpfs. Writing to
    the tensor faults: it is only ever a copy source. The tensor keeps the mapping alive.
    """
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), nbytes, access=mmap.ACCESS_READ)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "the buffer is not writable": by design
        return torch.frombuffer(mapping, dtype=torch.uint8)


def pin(tensor: torch.Tensor, read_only: bool = False) -> bool:
    """Page-lock a host mapping for fast device copies (CUDA only); returns whether it worked.

    A mapping that cannot be pinned stays usable: copies from it run pageable, slower. With
    ``read_only`` the pages are registered read-only, falling back to a plain registration
    where the device does not support that flag.
    """
    if not torch.cuda.is_available() or tensor.numel() == 0:
        return False
    cudart = torch.cuda.cudart()
    portable = HOST_REGISTER_PORTABLE
    attempts = [portable | HOST_REGISTER_READ_ONLY, portable] if read_only else [portable]
    errors = []
    for flags in attempts:
        code = _code(cudart.cudaHostRegister(tensor.data_ptr(), tensor.numel(), flags))
        if code == 0:
            return True
        _clear_last_error()
        errors.append(f"flags={flags}: {_error_string(code)}")
    log.warning(
        "cannot page-lock %d bytes of host memory (%s); device copies from it run pageable",
        tensor.numel(), "; ".join(errors),
    )  # fmt: skip
    return False


def unpin(tensor: torch.Tensor) -> None:
    """Undo ``pin``: ``tensor`` must start at the address that was registered."""
    if not torch.cuda.is_available() or tensor.numel() == 0:
        return
    code = _code(torch.cuda.cudart().cudaHostUnregister(tensor.data_ptr()))
    if code != 0:
        _clear_last_error()
        raise RuntimeError(
            f"cudaHostUnregister of {tensor.numel()} bytes at {tensor.data_ptr():#x} failed: "
            f"{_error_string(code)} (was this the registered base address?)"
        )


def _code(result: object) -> int:
    return int(getattr(result, "value", result))  # type: ignore[call-overload]


def _error_string(code: int) -> str:
    try:
        return f"{torch.cuda.cudart().cudaGetErrorString(code)} ({code})"
    except (RuntimeError, TypeError):
        return f"CUDA error {code}"


def _clear_last_error() -> None:
    """Reset this thread's CUDA "last error" (torch's binding has no ``cudaGetLastError``).

    Looked up in the CUDA runtime library this process already loaded, so it is the same
    runtime (and the same per-thread error state) torch uses.
    """
    fn = getattr(torch.cuda.cudart(), "cudaGetLastError", None)
    if fn is not None:
        fn()
        return
    lib = _loaded_cudart()
    if lib is not None:
        lib.cudaGetLastError()
    else:
        log.warning("no CUDA runtime library found to clear the last CUDA error")


_CUDART: list[ctypes.CDLL | None] = []


def _loaded_cudart() -> ctypes.CDLL | None:
    if not _CUDART:
        found = None
        try:
            with open("/proc/self/maps") as maps:
                paths = {line.split()[-1] for line in maps if "libcudart" in line}
        except OSError:
            paths = set()
        for path in sorted(paths):
            if os.path.basename(path).startswith("libcudart") and os.path.exists(path):
                found = ctypes.CDLL(path)  # already loaded: dlopen returns the same library
                break
        _CUDART.append(found)
    return _CUDART[0]


POOL_PREFIX = "aegaeon-hostkv-"


def remove_orphan_pools(directory: Path) -> list[Path]:
    """Unlink the pool files in ``directory`` whose process is gone (killed: its ``close()``
    never ran; gigabytes each, in a ``/dev/shm`` that outlives a container restart). A pool's
    process holds a lock on its file for its whole life, which the kernel drops when it dies."""
    removed = [path for path in directory.glob(f"{POOL_PREFIX}*.bin") if abandoned(path)]
    for path in removed:
        path.unlink(missing_ok=True)
    if removed:
        log.warning("removed %d host KV pools of processes gone: %s", len(removed), removed)
    return removed


def _create_locked(directory: Path, nbytes: int) -> tuple[Path, int]:
    """A new pool file of ``nbytes``, locked (see :func:`remove_orphan_pools`) before it takes
    the name a sweep looks for; the open descriptor holding the lock."""
    name = f"{POOL_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}.bin"
    staging = directory / f".{name}"
    with open(staging, "xb") as f:
        f.truncate(nbytes)
    lock = claim(staging)
    os.rename(staging, directory / name)
    return directory / name, lock


def _remove_pool(path: Path, fd: int) -> None:
    path.unlink(missing_ok=True)
    os.close(fd)


class HostKVPool:
    """A shared-memory byte pool with first-fit allocation; ``close()`` removes the file."""

    def __init__(self, nbytes: int, directory: Path, pin_memory: bool = False) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        remove_orphan_pools(directory)
        self.path, lock = _create_locked(directory, max(nbytes, 1))
        self.nbytes = nbytes
        self.buffer = map_file(self.path, max(nbytes, 1))
        self.pinned = pin(self.buffer) if pin_memory else False
        self.book = ExtentAllocator(nbytes)
        # A process that exits without close() must not leave its pool in /dev/shm (one killed
        # leaves it: the next pool made in the folder removes it).
        self._finalizer = weakref.finalize(self, _remove_pool, self.path, lock)

    @property
    def free_bytes(self) -> int:
        return self.book.free_bytes

    def allocate(self, nbytes: int) -> int | None:
        return self.book.allocate(nbytes)

    def free(self, offset: int, nbytes: int) -> None:
        self.book.free(offset, nbytes)

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        return self.buffer[offset : offset + nbytes]

    def close(self) -> None:
        if self.pinned:
            unpin(self.buffer)
            self.pinned = False
        self.buffer = torch.empty(0, dtype=torch.uint8)
        self._finalizer()
