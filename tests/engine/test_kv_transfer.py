"""The KV transfer server and client (``kv_transfer.py``) over real TCP on the loopback: bytes
arrive exactly, in several chunks; nothing is served without the offer's token; every failure
is a KVTransferError (the importing worker then re-prefills)."""

from __future__ import annotations

import asyncio
import os

import pytest
from aegaeon.gpu_worker.kv_transfer import (
    CHUNK_BYTES,
    KVTransferError,
    KVTransferServer,
    check_reachable,
    fetch_kv,
)


@pytest.fixture
def pool(tmp_path):
    """A host-pool file with random bytes (the server reads it as it reads a real pool)."""
    path = tmp_path / "pool.bin"
    data = os.urandom(3 * CHUNK_BYTES + 12345)
    path.write_bytes(data)
    return path, data


async def fetch(endpoint: str, token: bytes, nbytes: int) -> bytes:
    into = bytearray(nbytes)
    await asyncio.to_thread(fetch_kv, endpoint, token, memoryview(into))
    return bytes(into)


async def test_the_offered_region_arrives_exactly_in_several_chunks(pool):
    path, data = pool
    server = KVTransferServer("127.0.0.1:0", path)
    await server.start()
    try:
        offset, nbytes = 777, 2 * CHUNK_BYTES + 4321  # more than one recv_into
        token = server.offer("r1", offset, nbytes)
        assert await fetch(server.endpoint, token, nbytes) == data[offset : offset + nbytes]
        assert server.bytes_sent == nbytes
    finally:
        await server.stop()


async def test_nothing_is_served_without_a_live_token(pool):
    path, _ = pool
    server = KVTransferServer("127.0.0.1:0", path)
    await server.start()
    try:
        token = server.offer("r1", 0, 4096)
        with pytest.raises(KVTransferError, match="refused"):
            await fetch(server.endpoint, bytes(16), 4096)
        server.withdraw("r1")  # the scheduler freed the KV
        with pytest.raises(KVTransferError, match="refused"):
            await fetch(server.endpoint, token, 4096)
        again = server.offer("r2", 0, 4096)
        with pytest.raises(KVTransferError, match="offers 4096 bytes of KV, expected 100"):
            await fetch(server.endpoint, again, 100)
        assert server.bytes_sent == 0
    finally:
        await server.stop()


async def test_a_server_that_is_gone_is_a_transfer_error(pool):
    path, _ = pool
    server = KVTransferServer("127.0.0.1:0", path)
    await server.start()
    token = server.offer("r1", 0, 4096)
    endpoint = server.endpoint
    await server.stop()
    with pytest.raises(KVTransferError, match=endpoint):
        await fetch(endpoint, token, 4096)


def test_the_address_must_be_one_other_nodes_can_dial():
    assert check_reachable("") == ""  # no server
    assert check_reachable("10.1.2.3:7400") == "10.1.2.3:7400"
    for wildcard in ("0.0.0.0:7400", "[::]:7400"):
        with pytest.raises(ValueError, match="not a wildcard"):
            check_reachable(wildcard)
    with pytest.raises(ValueError, match="host:port"):
        check_reachable("10.1.2.3")
