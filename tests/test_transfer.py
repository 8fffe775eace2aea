"""The transfer server and client (``aegaeon/transfer.py``) over real TCP on the loopback: bytes
arrive exactly, in several chunks, with or without the checksum; an offer serves once and only
to its token; every failure is a TransferError (the asker then falls back)."""

from __future__ import annotations

import asyncio
import os

import pytest

from aegaeon import transfer
from aegaeon.transfer import CHUNK_BYTES, TransferError, TransferServer, check_reachable, fetch


@pytest.fixture
def pool(tmp_path):
    """A file with random bytes (the server reads it as it reads a host pool or a cache file)."""
    path = tmp_path / "pool.bin"
    data = os.urandom(3 * CHUNK_BYTES + 12345)
    path.write_bytes(data)
    return path, data


@pytest.fixture
async def server():
    server = TransferServer("127.0.0.1:0")
    await server.start()
    yield server
    await server.stop()


async def sent(server: TransferServer, nbytes: int) -> None:
    """Until the server has counted ``nbytes`` sent: it counts a region once its last write
    returns, which may be after the client has read it all."""
    async with asyncio.timeout(10):
        while server.bytes_sent < nbytes:
            await asyncio.sleep(0.01)
    assert server.bytes_sent == nbytes


async def fetched(endpoint: str, token: bytes, nbytes: int, **options) -> bytes:
    into = bytearray(nbytes)
    await asyncio.to_thread(fetch, endpoint, token, memoryview(into), **options)
    return bytes(into)


@pytest.mark.parametrize("checksum", [False, True], ids=["sendfile", "checksummed"])
async def test_the_offered_region_arrives_exactly_in_several_chunks(pool, server, checksum):
    path, data = pool
    offset, nbytes = 777, 2 * CHUNK_BYTES + 4321  # more than one chunk
    token = server.offer("r1", path, offset, nbytes)
    seen: list[int] = []
    got = await fetched(server.endpoint, token, nbytes, checksum=checksum, progress=seen.append)
    assert got == data[offset : offset + nbytes]
    await sent(server, nbytes)
    assert len(seen) >= 3 and seen[-1] == nbytes and seen == sorted(seen)


async def test_an_offer_serves_once_and_only_to_its_token(pool, server):
    path, _ = pool
    token = server.offer("r1", path, 0, 4096)
    with pytest.raises(TransferError, match="refused"):
        await fetched(server.endpoint, bytes(16), 4096)
    await fetched(server.endpoint, token, 4096)
    await sent(server, 4096)
    with pytest.raises(TransferError, match="refused"):  # served already
        await fetched(server.endpoint, token, 4096)
    withdrawn = server.offer("r2", path, 0, 4096)
    server.withdraw("r2")  # the bytes were freed
    with pytest.raises(TransferError, match="refused"):
        await fetched(server.endpoint, withdrawn, 4096)
    lapsed = server.offer("r3", path, 0, 4096, ttl_s=0.0)
    with pytest.raises(TransferError, match="refused"):
        await fetched(server.endpoint, lapsed, 4096)
    other = server.offer("r4", path, 0, 4096)
    with pytest.raises(TransferError, match="offers 4096 bytes, expected 100"):
        await fetched(server.endpoint, other, 100)


async def test_bytes_that_change_on_the_way_fail_the_checksum(pool, server, monkeypatch):
    path, _ = pool
    token = server.offer("r1", path, 0, 4096)
    real = transfer._send_hashed

    async def corrupting(writer, source, offer):
        writer_write = writer.write
        flipped = False

        def write(data):
            nonlocal flipped
            if not flipped and len(data) > 1:  # one bit of the first chunk, after hashing
                data, flipped = bytes([data[0] ^ 1]) + data[1:], True
            writer_write(data)

        monkeypatch.setattr(writer, "write", write)
        await real(writer, source, offer)

    monkeypatch.setattr(transfer, "_send_hashed", corrupting)
    with pytest.raises(TransferError, match="fail their checksum"):
        await fetched(server.endpoint, token, 4096, checksum=True)


async def test_a_server_that_is_gone_is_a_transfer_error(pool):
    path, _ = pool
    server = TransferServer("127.0.0.1:0")
    await server.start()
    token = server.offer("r1", path, 0, 4096)
    endpoint = server.endpoint
    await server.stop()
    with pytest.raises(TransferError, match=endpoint):
        await fetched(endpoint, token, 4096)


def test_the_address_must_be_one_other_nodes_can_dial():
    assert check_reachable("") == ""  # no server
    assert check_reachable("10.1.2.3:7400") == "10.1.2.3:7400"
    for wildcard in ("0.0.0.0:7400", "[::]:7400"):
        with pytest.raises(ValueError, match="not a wildcard"):
            check_reachable(wildcard)
    with pytest.raises(ValueError, match="host:port"):
        check_reachable("10.1.2.3")
