"""The gateway's HTTP/1.1 connections: uvicorn's h11 protocol with a deadline for request heads.

uvicorn closes a keep-alive connection idle past ``timeout_keep_alive`` only *after* a response;
a connection that never sends a request, or sends its head a few bytes at a time, is kept for
ever (each holding a socket and a file descriptor: a few thousand such clients exhaust the
process' limit, and no request limit sees them, having no request). Here a connection must
complete each request head (request line and headers) within ``HEADER_TIMEOUT_S`` of being
opened or of its last response; the timer stops once the head is read, so a slow body upload or
a long stream is not cut. Bodies are bounded by size (``BodyLimit``), not by time.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_S = 10.0


class HeadDeadlineProtocol(H11Protocol):
    """``H11Protocol`` that closes a connection whose next request head is not complete within
    ``header_timeout_s``."""

    header_timeout_s = HEADER_TIMEOUT_S
    _head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._head_read():
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self._head_read():  # waits for the next head
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _head_read(self) -> bool:
        """A request is in progress: its head was parsed (uvicorn made its cycle)."""
        return self.cycle is not None and not self.cycle.response_complete

    def _arm(self) -> None:
        self._disarm()
        self._head_deadline = self.loop.call_later(self.header_timeout_s, self._expire)

    def _disarm(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _expire(self) -> None:
        self._head_deadline = None
        if not self._head_read() and not self.transport.is_closing():
            self.transport.close()


def head_deadline_protocol(timeout_s: float) -> type[HeadDeadlineProtocol]:
    """The protocol class with another deadline (tests use a short one)."""
    return type("HeadDeadlineProtocol", (HeadDeadlineProtocol,), {"header_timeout_s": timeout_s})
