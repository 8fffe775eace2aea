"""Device-side paged KV: reads and writes token rows of one model's blocks in the flat KV region.

A block of a model lives at an element offset ``o`` of the region with layout
``[layers, 2 (K,V), block_size, kv_heads * head_dim]``; token ``t`` of a request is row
``t % block_size`` of block ``table[t // block_size]``. Because different models' blocks sit at
offsets that are not multiples of each other's row size, reads use a sliding-window view of the
flat region (row i = elements [i, i + row)), so ``index_select`` can gather a row starting at
any element; writes use ``index_put_`` on the flat view (the window overlaps itself).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from aegaeon.gpu_worker.weights_loader import KVShape


@dataclass
class StepInputs:
    """What one decode step reads from the host, as device tensors of fixed shape: each request's
    token, length and block table. Everything else the step needs is computed from these on the
    device, so a CUDA graph captured with one set of these tensors replays with new values.

    ``blocks`` holds each request's block offsets (elements), padded with its first block;
    ``longest`` positions are read per request (at least every request's length); ``aligned``:
    every block starts at a multiple of the row size.
    """

    tokens: torch.Tensor  # [B] int64
    lengths: torch.Tensor  # [B] int64: the new token is at position length-1
    blocks: torch.Tensor  # [B, W] int64
    longest: int
    aligned: bool

    def to(self, device: torch.device) -> StepInputs:
        return StepInputs(self.tokens.to(device), self.lengths.to(device),
                          self.blocks.to(device), self.longest, self.aligned)  # fmt: skip

    def copy_(self, other: StepInputs) -> None:
        """Take ``other``'s values (same shapes): a captured graph's inputs before a replay."""
        self.tokens.copy_(other.tokens, non_blocking=True)
        self.lengths.copy_(other.lengths, non_blocking=True)
        self.blocks.copy_(other.blocks, non_blocking=True)


@dataclass
class StepIndex:
    """Where one decode step writes and reads every layer's K/V rows, computed once per step.

    Indices are rows of ``source`` (the row-tiled region when every block is row-aligned, else
    the sliding window, whose rows start at any element): ``write[l]`` are the new tokens' K rows
    then V rows ([2, B]); ``read[l]`` every token's K rows then V rows, flattened from
    [2, B, longest]. ``write_elems`` (unaligned only) are the element indices for ``index_put_``.
    """

    source: torch.Tensor
    write: torch.Tensor
    read: torch.Tensor
    write_elems: torch.Tensor | None
    valid: torch.Tensor  # [B, longest] bool: position < the request's length
    batch: int
    longest: int


class PagedKV:
    """One model's view of the KV region: its block shape and vectorized gather/scatter."""

    def __init__(self, region: torch.Tensor, shape: KVShape, block_size: int, aligned: bool = False) -> None:  # fmt: skip
        self.region = region
        self.shape = shape
        self.block_size = block_size
        self.row = shape.kv_heads * shape.head_dim
        self.block_elems = shape.block_elems(block_size)
        self.layer_stride = 2 * block_size * self.row  # elements from layer l's K to layer l+1's K
        self.window = region.as_strided((region.numel() - self.row + 1, self.row), (1, 1))
        self._cols = torch.arange(self.row, device=region.device)
        # When every block starts at a multiple of the row size (slabs sized so), rows tile the
        # region: plain 2-D row indexing, cheaper than the sliding window and element scatter.
        self.tiles = region[: region.numel() // self.row * self.row].view(-1, self.row)
        self.rows: torch.Tensor | None = self.tiles if aligned else None
        # Per layer: element offset of its K rows and of its V rows from layer 0's K row.
        steps = torch.arange(shape.layers, device=region.device)[:, None] * self.layer_stride
        self._layer_offsets = steps + torch.tensor([0, block_size * self.row], device=region.device)

    def token_bases(self, tables: list[list[int]], positions: list[list[int]]) -> torch.Tensor:
        """Element offset of layer 0's K row for each (request, position); same nesting, flattened."""
        flat: list[int] = []
        bs, row = self.block_size, self.row
        for table, pos in zip(tables, positions, strict=True):
            flat.extend(table[p // bs] + (p % bs) * row for p in pos)
        return torch.tensor(flat, dtype=torch.int64, device=self.region.device)

    def padded_bases(self, tables: list[list[int]], lengths: list[int]) -> torch.Tensor:
        """[B, longest] element offsets of every token's layer-0 K row, computed on the device
        from the block tables; positions past a request's length point at its token 0 (real
        memory, masked out by the caller)."""
        longest = max(lengths)
        width = -(-longest // self.block_size)
        padded = [t[:width] + [t[0]] * (width - len(t[:width])) for t in tables]
        table = torch.tensor(padded, dtype=torch.int64, device=self.region.device)
        pos = torch.arange(longest, device=self.region.device)
        lens = torch.tensor(lengths, device=self.region.device)[:, None]
        pos = torch.where(pos < lens, pos, 0)
        return table.gather(1, pos // self.block_size) + (pos % self.block_size) * self.row

    def step_inputs(
        self,
        tokens: list[int],
        lengths: list[int],
        tables: list[list[int]],
        width: int | None = None,
    ) -> StepInputs:
        """A decode step's inputs as host tensors; ``width`` blocks per request (default: what
        the longest request needs) and ``width * block_size`` positions read when given."""
        needed = -(-max(lengths) // self.block_size)
        cols = width or needed
        padded = [t[:cols] + [t[0]] * (cols - len(t[:cols])) for t in tables]
        aligned = all(o % self.row == 0 for table in tables for o in table)
        return StepInputs(
            torch.tensor(tokens, dtype=torch.int64),
            torch.tensor(lengths, dtype=torch.int64),
            torch.tensor(padded, dtype=torch.int64),
            cols * self.block_size if width else max(lengths),
            aligned,
        )

    def step_index(self, step: StepInputs) -> StepIndex:
        """Rows every layer touches in a decode step, from the step's device tensors alone
        (tensor operations only: a CUDA graph captures them).

        Positions past a request's length read its token 0: real, finite memory (a block's
        unwritten rows may hold anything, NaN included), masked by the caller.
        """
        device, bs, row, longest = self.region.device, self.block_size, self.row, step.longest
        unit = row if step.aligned else 1  # indices count rows of the tiles, or elements
        blocks = step.blocks // unit if step.aligned else step.blocks
        batch = blocks.shape[0]
        offsets = torch.arange(0, bs * row // unit, row // unit, device=device)
        per_pos = (blocks[:, :, None] + offsets).view(batch, -1)[:, :longest]
        valid = torch.arange(longest, device=device) < step.lengths[:, None]
        per_pos = torch.where(valid, per_pos, per_pos[:, :1])
        layer = self._layer_offsets[:, :, None] // unit  # [layers, 2, 1]
        read = (per_pos.view(1, 1, -1) + layer).view(self.shape.layers, -1)
        last = step.lengths - 1
        new = blocks.gather(1, (last // bs)[:, None])[:, 0] + last % bs * (row // unit)
        write = new + layer
        if step.aligned:
            return StepIndex(self.tiles, write, read, None, valid, batch, longest)
        elems = (write[..., None] + self._cols).view(self.shape.layers, -1)
        return StepIndex(self.window, write, read, elems, valid, batch, longest)

    def write_step(self, layer: int, index: StepIndex, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the step's new K and V rows ([B, kv_heads * head_dim]) of ``layer``."""
        if index.write_elems is None:
            rows = index.write[layer]
            index.source.index_copy_(0, rows[0], k)
            index.source.index_copy_(0, rows[1], v)
            return
        self.region.index_put_((index.write_elems[layer],), torch.cat((k, v)).view(-1))

    def read_step(self, layer: int, index: StepIndex) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of ``layer`` for every (request, position) as [B, kv_heads, longest, head_dim]
        (strided views of one gathered tensor: the layout attention reads)."""
        kv = index.source.index_select(0, index.read[layer]).view(
            2, index.batch, index.longest, self.shape.kv_heads, self.shape.head_dim
        )
        return kv[0].transpose(1, 2), kv[1].transpose(1, 2)

    def write(self, layer: int, bases: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store K and V rows ([N, kv_heads * head_dim]) of ``layer`` at token ``bases``."""
        k_at = bases + layer * self.layer_stride
        v_at = k_at + self.block_size * self.row
        if self.rows is not None:
            self.rows.index_copy_(0, torch.cat((k_at, v_at)) // self.row, torch.cat((k, v)))
            return
        index = torch.cat((k_at, v_at))[:, None] + self._cols
        self.region.index_put_((index.view(-1),), torch.cat((k, v)).reshape(-1))

    def gather(self, layer: int, bases: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V rows of ``layer`` at ``bases`` (any shape S) as [*S, kv_heads, head_dim]."""
        k_at = bases + layer * self.layer_stride
        shape = (*bases.shape, self.shape.kv_heads, self.shape.head_dim)
        if self.rows is not None:
            k = self.rows.index_select(0, k_at.reshape(-1) // self.row).view(shape)
            v_at = k_at + self.block_size * self.row
            return k, self.rows.index_select(0, v_at.reshape(-1) // self.row).view(shape)
        k = self.window.index_select(0, k_at.reshape(-1)).view(shape)
        v = self.window.index_select(0, (k_at + self.block_size * self.row).reshape(-1)).view(shape)
        return k, v

    def runs(self, blocks: list[int]) -> list[tuple[int, int, int]]:
        """(first index, region offset, block count) of runs of adjacent blocks: one copy each."""
        out: list[tuple[int, int, int]] = []
        for i, offset in enumerate(blocks):
            if out and out[-1][1] + out[-1][2] * self.block_elems == offset:
                out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
            else:
                out.append((i, offset, 1))
        return out

    def read_blocks(self, blocks: list[int], out: torch.Tensor, non_blocking: bool = False) -> None:
        """Copy whole blocks into ``out`` ([n, block_elems], host memory) for swap-out."""
        flat = out.view(-1)
        for first, offset, count in self.runs(blocks):
            n = count * self.block_elems
            start = first * self.block_elems
            flat[start : start + n].copy_(
                self.region[offset : offset + n], non_blocking=non_blocking
            )

    def write_blocks(
        self, blocks: list[int], data: torch.Tensor, non_blocking: bool = False
    ) -> None:
        """Put whole blocks back (swap-in): one slice copy per run of blocks, no allocation."""
        flat = data.view(-1)
        for first, offset, count in self.runs(blocks):
            n = count * self.block_elems
            start = first * self.block_elems
            self.region[offset : offset + n].copy_(
                flat[start : start + n], non_blocking=non_blocking
            )
