"""``Bus.request_idempotent``: a request whose answer was lost while the asker's connection was
down (its NATS server crashed) is asked again once the connection is back, instead of waiting
out its timeout; ``Bus.publish_idempotent``: a message lost with its server is sent again. The
client reaches a real nats-server through a TCP relay the test can cut."""

from __future__ import annotations

import asyncio
import time

from nats_relay import Relay

from aegaeon.bus import Bus
from aegaeon.config import BusConfig
from aegaeon.protocol import CancelRequest, EnsureCached, ModelReply

SUBJECT = "reconnect.ensure"
CANCEL_SUBJECT = "reconnect.cancel"
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


def test_an_idempotent_publish_lost_with_its_server_is_sent_again_on_reconnecting(nats_server):
    """The relay swallows the cancel (the server "accepted" it and crashed before delivering
    it), then drops the connection: the publisher sends the cancel again once reconnected."""

    async def run() -> list[CancelRequest]:
        relay = Relay(nats_server.port)
        relay_port = await relay.start()
        receiver = await Bus.connect(BusConfig(nats_url=nats_server.url), "receiver")
        sender = await Bus.connect(BusConfig(nats_url=f"nats://127.0.0.1:{relay_port}"), "sender")
        received: list[CancelRequest] = []
        arrived = asyncio.Event()

        async def on_cancel(cancel: CancelRequest, _msg) -> None:
            received.append(cancel)
            arrived.set()

        await receiver.subscribe(CANCEL_SUBJECT, CancelRequest, on_cancel)
        await receiver.nc.flush()
        try:
            relay.swallowing = True
            await sender.publish_idempotent(CANCEL_SUBJECT, CancelRequest("r1", "abort"))
            while not any(b"r1" in chunk for chunk in relay.swallowed):
                await asyncio.sleep(0.01)
            relay.swallowing = False
            relay.cut()
            await asyncio.wait_for(arrived.wait(), TIMEOUT_S)
            return received
        finally:
            await sender.close()
            await receiver.close()
            relay.close()

    received = asyncio.run(run())
    assert [c.request_id for c in received] == ["r1"]
