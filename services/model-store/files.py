"""A model folder's small files (tokenizer, config, chat template) over the bus
(``models.file``): the store's side reads one chunk, :func:`fetch_file` asks for the whole file
chunk by chunk. Weights never travel this way: they move through the host cache."""

from __future__ import annotations

from pathlib import Path

from aegaeon.bus import Bus
from aegaeon.protocol import FetchFile, FileChunk

MAX_CHUNK = 512 * 1024
"""Largest FetchFile chunk: well under NATS's 1 MiB payload limit."""
MAX_SERVED_FILE = 64 * 1024 * 1024
"""FetchFile serves small files (tokenizer, config); weights move through shared memory."""
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")


def read_chunk(model_dir: Path, request: FetchFile) -> FileChunk:
    """One chunk of a small, non-weight file directly inside a model folder."""
    name = request.file
    if not name or "/" in name or "\\" in name or name.startswith("."):
        return FileChunk(error=f"invalid file name {name!r}: a plain file name in the model folder")
    if name.endswith(WEIGHT_SUFFIXES):
        return FileChunk(error=f"{name} is a weights file: weights move through the host cache")
    path = model_dir / name
    if not path.is_file():
        return FileChunk(error=f"model {request.name!r} has no file {name!r}")
    total = path.stat().st_size
    if total > MAX_SERVED_FILE:
        return FileChunk(
            error=f"{name} is {total} bytes; only files up to {MAX_SERVED_FILE} are served"
        )
    if request.offset < 0 or request.length <= 0:
        return FileChunk(error="offset must be >= 0 and length > 0")
    with path.open("rb") as f:
        f.seek(request.offset)
        data = f.read(min(request.length, MAX_CHUNK))
    return FileChunk(data=data, total=total)


async def fetch_file(bus: Bus, model: str, file: str, timeout: float = 10.0) -> bytes:
    """Client side of ``models.file``: the whole file, chunk by chunk (a chunk is asked again
    after a reconnect: a read may be answered twice). Raises FileNotFoundError."""
    parts: list[bytes] = []
    offset, total = 0, None
    while total is None or offset < total:
        request = FetchFile(model, file, offset, MAX_CHUNK)
        chunk = await bus.request_idempotent(
            bus.subjects.models("file"), request, FileChunk, timeout
        )
        if chunk.error:
            raise FileNotFoundError(chunk.error)
        total = chunk.total
        if not chunk.data and offset < total:
            raise OSError(f"{model}/{file}: empty chunk at offset {offset} of {total}")
        parts.append(chunk.data)
        offset += len(chunk.data)
    return b"".join(parts)
