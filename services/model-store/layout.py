"""The host-cache file layout: several safetensors shards merged into one aligned file (pure).

::

    ┌────────┬──────────────────────────┬─────────┬───┬─────────┬───┬─────────┐
    │ u64 n  │ JSON header, space-padded│ tensor0 │pad│ tensor1 │pad│ tensor2 │
    └────────┴──────────────────────────┴─────────┴───┴─────────┴───┴─────────┘
    0        8                  data_offset (multiple of ALIGN)
             every tensor starts at a multiple of ALIGN bytes, in the file and in the data section

The data section is one contiguous range, so a worker brings a whole model to its device with one
bulk copy and binds tensor views at the header's offsets (``aegaeon.weights.read_index`` reads it).
When every tensor's size is a multiple of ALIGN there are no gaps and the file is also a standard
safetensors file; otherwise the gaps are zero bytes between tensors.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from aegaeon.weights import SafetensorsIndex

ALIGN = 64
"""Byte alignment of the data section and of every tensor (cache lines; vector loads on device)."""


def align_up(value: int, align: int = ALIGN) -> int:
    return (value + align - 1) // align * align


@dataclass(frozen=True)
class Placement:
    """Copy ``nbytes`` from ``source`` at file offset ``source_offset`` to data offset ``offset``."""

    name: str
    source: Path
    source_offset: int
    offset: int
    nbytes: int


@dataclass(frozen=True)
class MergedLayout:
    """The merged file: its header bytes (length prefix included) and where each tensor goes."""

    header: bytes
    placements: list[Placement]
    data_bytes: int

    @property
    def data_offset(self) -> int:
        return len(self.header)

    @property
    def file_bytes(self) -> int:
        return self.data_offset + self.data_bytes


def plan_merge(shards: list[SafetensorsIndex], metadata: dict[str, str]) -> MergedLayout:
    """Lay the tensors of ``shards`` out in one file, shard order then offset order, aligned."""
    placements: list[Placement] = []
    entries: dict[str, dict] = {}
    cursor = 0
    for shard in shards:
        for name, entry in sorted(shard.tensors.items(), key=lambda item: item[1].start):
            if name in entries:
                raise ValueError(f"tensor {name!r} appears in more than one shard")
            cursor = align_up(cursor)
            source_offset = shard.data_offset + entry.start
            placements.append(Placement(name, shard.path, source_offset, cursor, entry.nbytes))
            entries[name] = {
                "dtype": entry.dtype,
                "shape": list(entry.shape),
                "data_offsets": [cursor, cursor + entry.nbytes],
            }
            cursor += entry.nbytes
    header_json = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":"))
    raw = header_json.encode()
    padded_len = align_up(8 + len(raw)) - 8  # safetensors allows trailing spaces in the header
    header = struct.pack("<Q", padded_len) + raw + b" " * (padded_len - len(raw))
    return MergedLayout(header, placements, cursor)
