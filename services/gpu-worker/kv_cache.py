"""Pure bookkeeping for device KV memory: slabs, blocks and block tables (no torch, no I/O).

The KV region of the arena is cut into equal slabs. A slab is bound to one block size (in
elements) while any block in it is used, and returns to the free list when its last block is
freed, so models with different layer counts, KV heads and head sizes share one pool::

    KV region: | slab 0 (blocks of A) | slab 1 (free) | slab 2 (blocks of B) | slab 3 (A) | ...
    block id = element offset of the block in the region (what the runners index with)
"""

from __future__ import annotations

from dataclasses import dataclass, field


class OutOfBlocks(RuntimeError):
    """The KV region cannot hold the blocks asked for (callers check ``can_allocate`` first)."""


@dataclass
class _Slab:
    block_elems: int
    free: list[int] = field(default_factory=list)  # block offsets, popped from the end
    used: int = 0


class SlabAllocator:
    """Allocates KV blocks of any size from fixed-size slabs of one flat region."""

    def __init__(self, num_slabs: int, slab_elems: int) -> None:
        self.num_slabs = num_slabs
        self.slab_elems = slab_elems
        self._free_slabs = list(range(num_slabs - 1, -1, -1))  # pop() gives the lowest slab
        self._bound: dict[int, _Slab] = {}

    def blocks_per_slab(self, block_elems: int) -> int:
        return self.slab_elems // block_elems

    def num_free_blocks(self, block_elems: int) -> int:
        in_bound = sum(len(s.free) for s in self._bound.values() if s.block_elems == block_elems)
        return in_bound + len(self._free_slabs) * self.blocks_per_slab(block_elems)

    def num_total_blocks(self, block_elems: int) -> int:
        return self.num_slabs * self.blocks_per_slab(block_elems)

    @property
    def num_free_slabs(self) -> int:
        return len(self._free_slabs)

    def can_allocate(self, block_elems: int, n: int) -> bool:
        return self.num_free_blocks(block_elems) >= n

    def allocate(self, block_elems: int, n: int) -> list[int]:
        """``n`` block offsets; fills the fullest bound slabs first to keep slabs freeable."""
        if block_elems > self.slab_elems:
            raise ValueError(
                f"a KV block of {block_elems} elements exceeds a slab ({self.slab_elems})"
            )
        if not self.can_allocate(block_elems, n):
            raise OutOfBlocks(f"need {n} blocks, {self.num_free_blocks(block_elems)} free")
        out: list[int] = []
        slabs = sorted(
            (s for s in self._bound.values() if s.block_elems == block_elems and s.free),
            key=lambda s: s.used, reverse=True,
        )  # fmt: skip
        for slab in slabs:
            while slab.free and len(out) < n:
                out.append(slab.free.pop())
                slab.used += 1
        while len(out) < n:
            slab = self._bind(block_elems)
            while slab.free and len(out) < n:
                out.append(slab.free.pop())
                slab.used += 1
        return out

    def free(self, block_elems: int, offsets: list[int]) -> None:
        """Return blocks; a slab whose last block comes back is unbound."""
        for offset in offsets:
            index = offset // self.slab_elems
            slab = self._bound[index]
            if slab.block_elems != block_elems:
                raise ValueError(f"block {offset} belongs to a slab of another block size")
            slab.free.append(offset)
            slab.used -= 1
            if slab.used == 0:
                del self._bound[index]
                self._free_slabs.append(index)
                self._free_slabs.sort(reverse=True)

    def _bind(self, block_elems: int) -> _Slab:
        index = self._free_slabs.pop()
        start = index * self.slab_elems
        count = self.blocks_per_slab(block_elems)
        slab = _Slab(block_elems, [start + i * block_elems for i in range(count - 1, -1, -1)])
        self._bound[index] = slab
        return slab


def blocks_needed(num_tokens: int, block_size: int) -> int:
    """Blocks a request with ``num_tokens`` tokens of KV occupies."""
    return -(-num_tokens // block_size)


class ExtentAllocator:
    """First-fit byte ranges of one host buffer, coalesced on free (the host KV pool's book)."""

    def __init__(self, total: int, align: int = 4096) -> None:
        self.total = total
        self.align = align
        self._free: list[tuple[int, int]] = [(0, total)] if total > 0 else []  # (start, size)

    @property
    def free_bytes(self) -> int:
        return sum(size for _, size in self._free)

    def allocate(self, nbytes: int) -> int | None:
        """Start of a range of at least ``nbytes``, or None when nothing fits."""
        need = max(self.align, -(-nbytes // self.align) * self.align)
        for i, (start, size) in enumerate(self._free):
            if size >= need:
                self._free[i] = (start + need, size - need)
                if size == need:
                    del self._free[i]
                return start
        return None

    def size_of(self, nbytes: int) -> int:
        return max(self.align, -(-nbytes // self.align) * self.align)

    def free(self, start: int, nbytes: int) -> None:
        self._free.append((start, self.size_of(nbytes)))
        self._free.sort()
        merged: list[tuple[int, int]] = []
        for s, n in self._free:
            if merged and merged[-1][0] + merged[-1][1] == s:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((s, n))
        self._free = merged
