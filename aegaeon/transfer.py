"""Bulk bytes between nodes: one direct TCP connection per transfer, from a file region on one
host into memory on another. NATS carries only the offer (its payloads are capped at 1 MiB and
every byte would cross the servers).

Two things travel this way: a prefilled request's KV, from the prefill worker's host KV pool to
a decode worker on another node (``gpu-worker/handoff.py``), and a model's weights, from one
node's host cache to another's (``model-store/peers.py``). The side that has the bytes runs a
:class:`TransferServer` on its own address and *offers* a region of a file under a fresh token;
the offer travels on the (authenticated) bus; the other side calls :func:`fetch` with it. An
offer serves once (a failed transfer falls back: re-prefill, or a load from disk), and lapses
after its time to live.

The wire is one request and one answer per connection::

    client → server   MAGIC (4 bytes) · flags (1 byte: 1 = checksum) · token (16 bytes)
    server → client   status (1 byte: 0 ok, 1 refused) · length (8 bytes, big-endian)
                      then ``length`` bytes: the region, or why it was refused (UTF-8)
                      then, with the checksum flag, the region's SHA-256 (32 bytes)

Without the checksum the server ``sendfile``s the region (no copy through Python) and TCP's own
checksums guard the bytes; with it both ends hash the stream and the client compares digests.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MAGIC = b"AXF1"
TOKEN_BYTES = 16
CHECKSUM = 1
_REQUEST = struct.Struct(f"!4sB{TOKEN_BYTES}s")
_ANSWER = struct.Struct("!BQ")
OK, REFUSED = 0, 1
DIGEST_BYTES = hashlib.sha256().digest_size
CHUNK_BYTES = 4 << 20
"""One read or ``recv_into`` at most: the progress granularity, not a protocol unit."""
CONNECT_TIMEOUT_S = 5.0
STALL_TIMEOUT_S = 30.0
"""A transfer that moves no byte for this long has failed."""
OFFER_TTL_S = 120.0
"""An offer nobody fetched lapses after this long (its asker gave up or died)."""


class TransferError(OSError):
    """The bytes could not be fetched; the message says from where and why."""


@dataclass(frozen=True)
class Offer:
    key: str
    path: Path
    offset: int
    nbytes: int
    expires: float  # monotonic


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) → (host, port). Raises ValueError saying why not."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"transfer address {address!r}: expected host:port")
    return host.strip("[]"), int(port)


def check_reachable(address: str) -> str:
    """``address`` if other nodes can dial it ('' too: no server); a wildcard host is refused,
    because the address is advertised."""
    if not address:
        return address
    host, _ = parse_address(address)
    if host in ("0.0.0.0", "::", "*"):
        raise ValueError(
            f"transfer address {address!r}: give the address other nodes reach this host at "
            "(it is advertised to them), not a wildcard"
        )
    return address


class TransferServer:
    """Serves offered file regions to the holders of their tokens.

    ``await start()`` binds (port 0: any free one; :attr:`endpoint` says which); :meth:`offer`
    and :meth:`withdraw` are called from the event loop."""

    def __init__(self, address: str) -> None:
        self.host, self.port = parse_address(address)
        self._offers: dict[bytes, Offer] = {}
        self._tokens: dict[str, bytes] = {}  # offer key → its token
        self._server: asyncio.Server | None = None
        self.bytes_sent = 0

    @property
    def endpoint(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("transfer server on %s", self.endpoint)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def offer(self, key: str, path: Path, offset: int, nbytes: int, ttl_s: float = OFFER_TTL_S) -> bytes:  # fmt: skip
        """Serve ``nbytes`` at ``offset`` of ``path``, once, to the holder of the returned token
        (a new offer under the same ``key`` replaces the old one)."""
        self._lapse()
        self.withdraw(key)
        token = secrets.token_bytes(TOKEN_BYTES)
        self._offers[token] = Offer(key, path, offset, nbytes, time.monotonic() + ttl_s)
        self._tokens[key] = token
        return token

    def withdraw(self, key: str) -> None:
        """The bytes are gone (freed, evicted): the offer's token serves nothing any more."""
        token = self._tokens.pop(key, None)
        if token is not None:
            self._offers.pop(token, None)

    def _lapse(self) -> None:
        now = time.monotonic()
        for offer in [o for o in self._offers.values() if o.expires <= now]:
            self.withdraw(offer.key)

    def _take(self, ask: bytes) -> tuple[Offer | None, bool]:
        """The offer a request names (and drops, as it serves once), and whether it asks for
        the checksum."""
        magic, flags, token = _REQUEST.unpack(ask)
        offer = self._offers.get(token) if magic == MAGIC else None
        if offer is None or offer.expires <= time.monotonic():
            return None, False
        self.withdraw(offer.key)
        return offer, bool(flags & CHECKSUM)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                offer, checksum = self._take(await reader.readexactly(_REQUEST.size))
            if offer is None:
                reason = b"nothing is offered under this token (served, lapsed or withdrawn)"
                writer.write(_ANSWER.pack(REFUSED, len(reason)) + reason)
            else:
                writer.write(_ANSWER.pack(OK, offer.nbytes))
                with offer.path.open("rb") as source:
                    if checksum:
                        await _send_hashed(writer, source, offer)
                    else:
                        loop = asyncio.get_running_loop()
                        await loop.sendfile(writer.transport, source, offer.offset, offer.nbytes)
                self.bytes_sent += offer.nbytes
            await writer.drain()
        except (OSError, EOFError, TimeoutError, struct.error) as exc:
            log.warning("transfer to %s failed: %s", peer, exc)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def _send_hashed(writer: asyncio.StreamWriter, source, offer: Offer) -> None:
    """The region in chunks (read and hashed in a thread), then its digest."""
    digest = hashlib.sha256()

    def read_chunk(nbytes: int) -> bytes:
        data = source.read(nbytes)
        digest.update(data)
        return data

    source.seek(offer.offset)
    left = offer.nbytes
    while left > 0:
        data = await asyncio.to_thread(read_chunk, min(left, CHUNK_BYTES))
        if not data:
            raise EOFError(f"{offer.path} ended {left} bytes before the offered region")
        writer.write(data)
        await writer.drain()
        left -= len(data)
    writer.write(digest.digest())


def fetch(endpoint: str, token: bytes, into: memoryview, *, checksum: bool = False,
          progress: Callable[[int], None] | None = None) -> None:  # fmt: skip
    """Fill ``into`` (writable bytes: a reserved region of a host pool, a mapped file) with
    what ``endpoint`` offers under ``token``; ``progress`` is told the bytes received so far
    after each chunk. Blocking: run it in a thread. Raises TransferError when the server
    refuses, the sizes or the digests disagree, or the stream breaks."""
    host, port = parse_address(endpoint)
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S) as conn:
            conn.settimeout(STALL_TIMEOUT_S)
            conn.sendall(_REQUEST.pack(MAGIC, CHECKSUM if checksum else 0, token))
            status, length = _ANSWER.unpack(_receive_exactly(conn, _ANSWER.size))
            if status != OK:
                reason = _receive_exactly(conn, min(length, 4096)).decode(errors="replace")
                raise TransferError(f"{endpoint} refused: {reason}")
            if length != len(into):
                raise TransferError(f"{endpoint} offers {length} bytes, expected {len(into)}")
            digest = hashlib.sha256() if checksum else None
            received = 0
            while received < length:
                chunk = into[received : received + CHUNK_BYTES]
                n = conn.recv_into(chunk)
                if n == 0:
                    raise TransferError(f"{endpoint} closed after {received} of {length} bytes")
                if digest is not None:
                    digest.update(chunk[:n])
                received += n
                if progress is not None:
                    progress(received)
            if digest is not None and _receive_exactly(conn, DIGEST_BYTES) != digest.digest():
                raise TransferError(f"{endpoint}: the {length} bytes received fail their checksum")
    except TransferError:
        raise
    except OSError as exc:
        raise TransferError(f"from {endpoint}: {exc}") from exc


def _receive_exactly(conn: socket.socket, nbytes: int) -> bytes:
    data = bytearray()
    while len(data) < nbytes:
        chunk = conn.recv(nbytes - len(data))
        if not chunk:
            raise TransferError(f"connection closed after {len(data)} of {nbytes} bytes")
        data += chunk
    return bytes(data)
