"""The fencing token: a worker that heard a newer scheduler term drops an older term's commands,
carried as a header by the term's bus over a real NATS server."""

from __future__ import annotations

import asyncio

from aegaeon.scheduler.fencing import FencedBus

from aegaeon.bus import Bus, BusConfig
from aegaeon.fencing_token import EPOCH_HEADER, EpochFence, epoch_headers
from aegaeon.protocol import Preempt


def test_the_fence_takes_the_newest_term_and_drops_older_ones():
    fence = EpochFence()
    assert fence.admits({}) and fence.admits(None)  # a sole scheduler sends no epoch
    assert fence.admits(epoch_headers(10))
    assert fence.admits(epoch_headers(12)) and fence.newest == 12
    assert not fence.admits(epoch_headers(10))  # the deposed leader
    assert fence.admits(epoch_headers(12))  # the same term again
    assert fence.admits({EPOCH_HEADER: "garbled"})
    assert epoch_headers(0) == {}


async def test_a_terms_bus_stamps_its_epoch_on_what_it_sends(nats_server):
    config = BusConfig(nats_url=nats_server.url, prefix="fence")
    bus = await Bus.connect(config, "fence-test")
    heard: asyncio.Queue = asyncio.Queue()
    try:
        await bus.nc.subscribe("fence.cmd", cb=heard.put)
        old, new = FencedBus(bus, lambda: True, 5), FencedBus(bus, lambda: True, 9)
        fence = EpochFence()
        for term in (new, old):
            await term.publish("fence.cmd", Preempt(1))
        admitted = []
        for _ in range(2):
            msg = await asyncio.wait_for(heard.get(), 30)
            admitted.append(fence.admits(msg.headers))
        assert admitted == [True, False]
        await bus.publish("fence.cmd", Preempt(2))  # a plain bus (a sole scheduler): no epoch
        msg = await asyncio.wait_for(heard.get(), 30)
        assert EPOCH_HEADER not in (msg.headers or {}) and fence.admits(msg.headers)
    finally:
        await bus.close()
