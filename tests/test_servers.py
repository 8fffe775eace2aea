"""The embedded servers start from the pip-installed binaries and answer."""

import argparse
import asyncio
import json
import stat

import nats
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from aegaeon import launcher
from aegaeon.bus import connect_redis
from aegaeon.config import BusConfig
from aegaeon.servers import start_nats, start_redis

NO_RETRY = Retry(NoBackoff(), 0)  # a refused login is an answer, not a blip to retry


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


# ------------------------------------------------------------ the servers of `aegaeon up`


def test_a_password_protected_nats_refuses_clients_without_it(tmp_path):
    server = start_nats(tmp_path / "nats", user="aegaeon", password="s3cret-of-this-run")

    async def attempt(**credentials) -> bool:
        try:
            nc = await nats.connect(server.url, allow_reconnect=False, connect_timeout=2,
                                    max_reconnect_attempts=0, **credentials)  # fmt: skip
        except Exception:
            return False
        await nc.close()
        return True

    try:
        assert not asyncio.run(attempt())
        assert not asyncio.run(attempt(user="aegaeon", password="guess"))
        assert asyncio.run(attempt(user="aegaeon", password="s3cret-of-this-run"))
        assert "s3cret" not in " ".join(server.process.args)  # not on the command line (ps)
        conf = tmp_path / "nats" / "nats.conf"
        assert stat.S_IMODE(conf.stat().st_mode) == 0o600
    finally:
        server.stop()


def test_a_password_protected_redis_refuses_clients_and_has_no_config_or_module(tmp_path):
    server = start_redis(tmp_path / "redis", password="s3cret-of-this-run")
    try:
        anonymous = redis.Redis(host="127.0.0.1", port=server.port, retry=NO_RETRY)
        with pytest.raises(redis.AuthenticationError):
            anonymous.ping()
        anonymous.close()
        wrong = redis.Redis(host="127.0.0.1", port=server.port, password="guess", retry=NO_RETRY)
        with pytest.raises(redis.AuthenticationError):
            wrong.ping()
        wrong.close()
        client = redis.Redis.from_url(server.url)  # the URL carries the password
        assert client.ping()
        for command in (("CONFIG", "SET", "dir", "/tmp"), ("MODULE", "LIST")):
            with pytest.raises(redis.ResponseError, match="unknown command"):
                client.execute_command(*command)
        client.close()
        assert "s3cret" not in " ".join(server.process.args)
    finally:
        server.stop()


def test_aegaeon_up_gives_its_servers_credentials_of_its_own_and_a_private_connection_file(
    tmp_path, monkeypatch
):
    for name in ("AEGAEON_NATS_URL", "AEGAEON_REDIS_URL", "AEGAEON_NATS_USER",
                 "AEGAEON_NATS_PASSWORD"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    parser = argparse.ArgumentParser()
    launcher.add_arguments(parser)
    stack = launcher.Stack(parser.parse_args(["--home", str(tmp_path)]))
    stack.logs.mkdir(parents=True)
    try:
        stack.start_servers()
        env = stack.env
        assert env["AEGAEON_NATS_PASSWORD"] and "@" in env["AEGAEON_REDIS_URL"]
        connection = tmp_path / launcher.CONNECTION_FILE
        assert stat.S_IMODE(connection.stat().st_mode) == 0o600
        assert json.loads(connection.read_text())["AEGAEON_REDIS_URL"] == env["AEGAEON_REDIS_URL"]
        anonymous = redis.Redis(host="127.0.0.1", port=stack.servers[1].port, retry=NO_RETRY)
        with pytest.raises(redis.AuthenticationError):
            anonymous.ping()
        anonymous.close()
    finally:
        stack.stop()
    assert not (tmp_path / launcher.CONNECTION_FILE).exists()


@pytest.mark.parametrize("max_connections", [None, 4])
def test_services_reach_a_password_protected_redis_with_the_password_from_the_environment(
    tmp_path, monkeypatch, max_connections
):
    """Compose and Kubernetes give AEGAEON_REDIS_PASSWORD from a secret and a URL without it;
    every service builds its client with connect_redis (the gateway with a bounded pool)."""
    server = start_redis(tmp_path / "redis", password="from-a-secret")
    try:
        monkeypatch.setenv("AEGAEON_REDIS_URL", f"redis://127.0.0.1:{server.port}/0")
        monkeypatch.setenv("AEGAEON_REDIS_PASSWORD", "from-a-secret")

        async def ping() -> bool:
            client = connect_redis(BusConfig(), max_connections)
            try:
                return bool(await client.ping())
            finally:
                await client.aclose()

        assert asyncio.run(ping())
        monkeypatch.delenv("AEGAEON_REDIS_PASSWORD")
        with pytest.raises(redis.AuthenticationError):
            asyncio.run(ping())
    finally:
        server.stop()
