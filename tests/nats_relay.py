"""A TCP relay in front of a real nats-server, for tests of what a client does when its
connection drops (as when its NATS server crashes): ``cut()`` it, the client reconnects."""

from __future__ import annotations

import asyncio
import contextlib


class Relay:
    """127.0.0.1:port → the server; ``cut()`` drops every connection through it (as a crashed
    server would), new ones are relayed again. While ``swallowing`` is set, what clients send is
    dropped instead of relayed (what a server accepted and lost when it crashed); each dropped
    chunk is appended to ``swallowed``."""

    def __init__(self, server_port: int) -> None:
        self.server_port = server_port
        self.writers: list[asyncio.StreamWriter] = []
        self.swallowing = False
        self.swallowed: list[bytes] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.server_port)
        self.writers += [client_w, server_w]

        async def pipe(
            src: asyncio.StreamReader, dst: asyncio.StreamWriter, upstream: bool
        ) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    if upstream and self.swallowing:
                        self.swallowed.append(data)
                        continue
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(client_r, server_w, True), pipe(server_r, client_w, False))

    def cut(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()

    def close(self) -> None:
        self.cut()
        self.server.close()
