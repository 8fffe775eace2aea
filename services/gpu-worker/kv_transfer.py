"""Prefill → decode KV hand-off across nodes: a direct worker-to-worker byte stream between host
KV pools.

On one node a decode worker maps the prefill worker's pool file (``Engine.import_kv``). Across
nodes the bytes must travel, and NATS carries control only (its payloads are capped at 1 MiB and
every byte would cross the servers): the exporting worker runs a :class:`KVTransferServer` on
its own address (``--kv-transfer-address``, advertised in its heartbeat and in each
``KVHandle.endpoint``), and the importing worker pulls the KV with :func:`fetch_kv` straight
into a region it reserved in its own host pool. The host pools stage both ends: the server sends
from its pool file with ``sendfile`` (no copy through Python), the client receives into its
pool with ``recv_into``, chunk by chunk.

The wire is one request and one answer per connection::

    client → server   MAGIC (4 bytes) · token (16 bytes)
    server → client   status (1 byte: 0 ok, 1 refused) · length (8 bytes, big-endian)
                      then ``length`` bytes: the KV, or the reason it was refused (UTF-8)

A handle's token is a fresh secret that travels only on the (authenticated) bus, so the port
serves no KV to a client that was not handed it; an offer ends when the scheduler frees the KV.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MAGIC = b"AKV1"
TOKEN_BYTES = 16
_ANSWER = struct.Struct("!BQ")
OK, REFUSED = 0, 1
CHUNK_BYTES = 4 << 20
"""One ``recv_into`` at most: the client's progress granularity, not a protocol unit."""
CONNECT_TIMEOUT_S = 5.0
STALL_TIMEOUT_S = 30.0
"""A transfer that moves no byte for this long has failed (the importer then re-prefills)."""


class KVTransferError(OSError):
    """The KV could not be fetched; the message says from where and why."""


@dataclass(frozen=True)
class Offer:
    offset: int
    nbytes: int


def new_token() -> bytes:
    return secrets.token_bytes(TOKEN_BYTES)


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) → (host, port). Raises ValueError saying why not."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"KV transfer address {address!r}: expected host:port")
    return host.strip("[]"), int(port)


def check_reachable(address: str) -> str:
    """``address`` if other nodes can dial it ('' too: no server); a wildcard host is refused,
    because the address is advertised."""
    if not address:
        return address
    host, _ = parse_address(address)
    if host in ("0.0.0.0", "::", "*"):
        raise ValueError(
            f"KV transfer address {address!r}: give the address other nodes reach this worker "
            "at (it is advertised to them), not a wildcard"
        )
    return address


class KVTransferServer:
    """Serves exported KV regions of one host pool file to the workers they were handed to.

    ``await start()`` binds (port 0: any free one; :attr:`endpoint` says which); :meth:`offer`
    and :meth:`withdraw` are called from the event loop as KV is exported and freed."""

    def __init__(self, address: str, pool_path: Path) -> None:
        self.host, self.port = parse_address(address)
        self.pool_path = pool_path
        self._offers: dict[bytes, Offer] = {}
        self._tokens: dict[str, bytes] = {}  # request id → its offer's token
        self._server: asyncio.Server | None = None
        self.bytes_sent = 0

    @property
    def endpoint(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("KV transfer server on %s", self.endpoint)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def offer(self, request_id: str, offset: int, nbytes: int) -> bytes:
        """Serve ``nbytes`` at ``offset`` of the pool to the holder of the returned token."""
        self.withdraw(request_id)
        token = new_token()
        self._offers[token] = Offer(offset, nbytes)
        self._tokens[request_id] = token
        return token

    def withdraw(self, request_id: str) -> None:
        """The request's KV is freed (or re-exported): its token serves nothing any more."""
        token = self._tokens.pop(request_id, None)
        if token is not None:
            self._offers.pop(token, None)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                ask = await reader.readexactly(len(MAGIC) + TOKEN_BYTES)
            offer = self._offers.get(ask[len(MAGIC) :]) if ask.startswith(MAGIC) else None
            if offer is None:
                reason = b"no KV is offered under this token (freed, or never exported here)"
                writer.write(_ANSWER.pack(REFUSED, len(reason)) + reason)
            else:
                writer.write(_ANSWER.pack(OK, offer.nbytes))
                with self.pool_path.open("rb") as pool:
                    loop = asyncio.get_running_loop()
                    await loop.sendfile(writer.transport, pool, offer.offset, offer.nbytes)
                self.bytes_sent += offer.nbytes
            await writer.drain()
        except (OSError, EOFError, TimeoutError) as exc:  # incomplete read included
            log.warning("KV transfer to %s failed: %s", peer, exc)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


def fetch_kv(endpoint: str, token: bytes, into: memoryview) -> None:
    """Fill ``into`` (writable bytes, e.g. a reserved region of this worker's host pool) with
    the KV that ``endpoint`` offers under ``token``. Blocking: run it in a thread. Raises
    KVTransferError when the server refuses, the sizes disagree or the stream breaks."""
    host, port = parse_address(endpoint)
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S) as conn:
            conn.settimeout(STALL_TIMEOUT_S)
            conn.sendall(MAGIC + token)
            status, length = _ANSWER.unpack(_receive_exactly(conn, _ANSWER.size))
            if status != OK:
                reason = _receive_exactly(conn, min(length, 4096)).decode(errors="replace")
                raise KVTransferError(f"{endpoint} refused the KV: {reason}")
            if length != len(into):
                raise KVTransferError(f"{endpoint} offers {length} bytes of KV, expected {len(into)}")  # fmt: skip
            received = 0
            while received < length:
                n = conn.recv_into(into[received : received + CHUNK_BYTES])
                if n == 0:
                    raise KVTransferError(f"{endpoint} closed after {received} of {length} bytes")
                received += n
    except KVTransferError:
        raise
    except OSError as exc:
        raise KVTransferError(f"KV from {endpoint}: {exc}") from exc


def _receive_exactly(conn: socket.socket, nbytes: int) -> bytes:
    data = bytearray()
    while len(data) < nbytes:
        chunk = conn.recv(nbytes - len(data))
        if not chunk:
            raise KVTransferError(f"connection closed after {len(data)} of {nbytes} header bytes")
        data += chunk
    return bytes(data)
