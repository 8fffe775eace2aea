"""The host KV pool: one shared-memory file that preempted requests' KV is swapped into.

Living in shared memory (``/dev/shm``) lets another process on the node (a decode instance)
map the same bytes, which is how KV moves from a prefill worker to a decode worker. On CUDA
the mapping is page-locked so copies to and from the device run at link speed.
"""

from __future__ import annotations

import os
import uuid
import weakref
from pathlib import Path

import torch
from aegaeon.gpu_worker.kv_cache import ExtentAllocator


def map_file(path: Path, nbytes: int, shared: bool = True) -> torch.Tensor:
    """A uint8 tensor over a file's bytes (mmap; nothing is read until touched)."""
    return torch.from_file(str(path), shared=shared, size=nbytes, dtype=torch.uint8)


def pin(tensor: torch.Tensor) -> bool:
    """Page-lock a host mapping for fast device copies (CUDA only); returns whether it worked."""
    if not torch.cuda.is_available() or tensor.numel() == 0:
        return False
    try:
        result = torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), tensor.numel(), 0)
        return int(getattr(result, "value", result)) == 0
    except (RuntimeError, TypeError, ValueError):  # not pinnable: copies run pageable, slower
        return False


def unpin(tensor: torch.Tensor) -> None:
    if torch.cuda.is_available() and tensor.numel() > 0:
        torch.cuda.cudart().cudaHostUnregister(tensor.data_ptr())


class HostKVPool:
    """A shared-memory byte pool with first-fit allocation; ``close()`` removes the file."""

    def __init__(self, nbytes: int, directory: Path, pin_memory: bool = False) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"aegaeon-hostkv-{os.getpid()}-{uuid.uuid4().hex[:8]}.bin"
        self.nbytes = nbytes
        with self.path.open("wb") as f:
            f.truncate(max(nbytes, 1))
        self.buffer = map_file(self.path, max(nbytes, 1))
        self.pinned = pin(self.buffer) if pin_memory else False
        self.book = ExtentAllocator(nbytes)
        # A process that exits without close() must not leave its pool in /dev/shm.
        self._finalizer = weakref.finalize(self, self.path.unlink, missing_ok=True)

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
