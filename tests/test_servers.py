"""The embedded servers start from the pip-installed binaries and answer."""

import asyncio

import nats
import redis


def test_nats_server_accepts_a_connection(nats_server):
    async def roundtrip() -> bytes:
        nc = await nats.connect(nats_server.url)
        sub = await nc.subscribe("ping")
        await nc.publish("ping", b"pong")
        msg = await sub.next_msg(timeout=2)
        await nc.close()
        return msg.data

    assert asyncio.run(roundtrip()) == b"pong"


def test_redis_server_stores_and_returns_a_value(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    client.set("k", "v")
    assert client.get("k") == b"v"
    client.close()
