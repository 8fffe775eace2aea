"""``Bus.request_idempotent``: a request whose answer was lost while the asker's connection was
down (its NATS server crashed) is asked again once the connection is back, instead of waiting
out its timeout. The asker reaches a real nats-server through a TCP relay the test can cut."""

from __future__ import annotations

import asyncio
import time

from nats_relay import Relay

from aegaeon.bus import Bus
from aegaeon.config import BusConfig
from aegaeon.protocol import EnsureCached, ModelReply

SUBJECT = "reconnect.ensure"
TIMEOUT_S = 60.0


def test_an_answer_lost_in_a_reconnect_is_asked_for_again_not_waited_out(nats_server):
    async def run() -> tuple[ModelReply, int, float]:
        relay = Relay(nats_server.port)
        relay_port = await relay.start()
        store = await Bus.connect(BusConfig(nats_url=nats_server.url), "store")
        asker = await Bus.connect(BusConfig(nats_url=f"nats://127.0.0.1:{relay_port}"), "asker")
        asked: list[EnsureCached] = []

        async def on_ensure(request: EnsureCached, msg) -> None:
            asked.append(request)
            if len(asked) == 1:  # the answer is "sent" while the asker is away: it never arrives
                relay.cut()
                return
            await store.reply(msg, ModelReply(error="second answer"))

        await store.subscribe(SUBJECT, EnsureCached, on_ensure)
        await store.nc.flush()
        try:
            start = time.monotonic()
            reply = await asker.request_idempotent(
                SUBJECT, EnsureCached("m"), ModelReply, timeout=TIMEOUT_S
            )
            return reply, len(asked), time.monotonic() - start
        finally:
            await asker.close()
            await store.close()
            relay.close()

    reply, asked, waited_s = asyncio.run(run())
    assert reply.error == "second answer" and asked == 2
    assert waited_s < TIMEOUT_S / 2  # asked again on reconnecting (~0.5 s), not waited out
