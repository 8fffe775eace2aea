"""The embedded servers start from the pip-installed binaries and answer."""

import argparse
import asyncio
import json
import stat
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import nats
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from aegaeon import launcher, servers, stack_plan
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


def test_a_bus_given_several_nats_servers_connects_through_one_that_is_up(nats_server):
    """AEGAEON_NATS_URL may list a cluster's members: the first is down, the second answers."""
    from aegaeon.bus import Bus
    from aegaeon.servers import free_port

    down = f"nats://127.0.0.1:{free_port()}"
    config = BusConfig(nats_url=f"{down}, {nats_server.url}", prefix="several")
    assert config.nats_servers == [down, nats_server.url]

    async def connect() -> str:
        bus = await Bus.connect(config, "several")
        try:
            return bus.nc.connected_url.geturl()
        finally:
            await bus.close()

    assert asyncio.run(connect()) == nats_server.url
    with pytest.raises(ValueError, match="comma-separated"):
        BusConfig(nats_url=f"{nats_server.url},redis://127.0.0.1:1")


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
        assert "@" in env["AEGAEON_REDIS_URL"] and env["AEGAEON_NATS_URL"].startswith("nats://")
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


def test_aegaeon_up_gives_each_service_only_the_nats_user_of_its_role(tmp_path, monkeypatch):
    """One user per role in the 0600 config; a service's environment holds its own password
    only; connection.json (this user's tools) the read-only observer's."""
    for name in ("AEGAEON_NATS_URL", "AEGAEON_REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AEGAEON_NATS_PASSWORD", "of-the-shell")  # not handed on
    parser = argparse.ArgumentParser()
    launcher.add_arguments(parser)
    args = parser.parse_args(["--home", str(tmp_path), "--workers", "2"])
    stack = launcher.Stack(args)
    stack.logs.mkdir(parents=True)
    try:
        stack.start_servers()
        children = stack_plan.plan_children(args, tmp_path, stack.logs, cache_bytes=1 << 20)
        passwords = {}
        for child in children:
            env = stack.child_env(child)
            assert env["AEGAEON_NATS_USER"] == child.kind, child.name
            passwords[child.kind] = env["AEGAEON_NATS_PASSWORD"]
            others = set(stack.bus_users) - {child.kind}
            held = set(env.values())
            assert not held & {stack.bus_users[r]["AEGAEON_NATS_PASSWORD"] for r in others}
        assert set(passwords) == {"gateway", "scheduler", "worker", "model-store"}
        assert len(set(passwords.values())) == 4 and "of-the-shell" not in passwords.values()
        connection = json.loads((tmp_path / launcher.CONNECTION_FILE).read_text())
        assert connection["AEGAEON_NATS_USER"] == "observer"
        assert connection["AEGAEON_NATS_PASSWORD"] not in passwords.values()
        nats_server = stack.servers[0]
        conf = tmp_path / "nats" / "nats.conf"
        assert stat.S_IMODE(conf.stat().st_mode) == 0o600
        assert not any(p in " ".join(nats_server.process.args) for p in passwords.values())

        async def attempt(user: str, password: str) -> bool:
            try:
                nc = await nats.connect(nats_server.url, user=user, password=password,
                                        allow_reconnect=False, connect_timeout=2)  # fmt: skip
            except Exception:
                return False
            await nc.close()
            return True

        assert asyncio.run(attempt("observer", connection["AEGAEON_NATS_PASSWORD"]))
        assert asyncio.run(attempt("worker", passwords["worker"]))
        assert not asyncio.run(attempt("worker", connection["AEGAEON_NATS_PASSWORD"]))
    finally:
        stack.stop()


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


# ------------------------------------------------------------ no orphans


def test_servers_stop_when_the_process_that_started_them_is_killed(tmp_path):
    """A benchmark or launcher killed with SIGKILL runs no cleanup: its NATS and Redis must go
    with it (the kernel's parent-death signal), not linger on their ports."""
    starter = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from pathlib import Path
            from aegaeon.servers import start_nats, start_redis
            nats = start_nats(Path({str(tmp_path)!r}) / "nats")
            redis = start_redis(Path({str(tmp_path)!r}) / "redis")
            print(nats.process.pid, redis.process.pid, flush=True)
            time.sleep(600)
        """)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert starter.stdout is not None
    pids = [int(pid) for pid in starter.stdout.readline().split()]
    assert len(pids) == 2 and all(alive(pid) for pid in pids)
    starter.kill()
    starter.wait()
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in pids), "a server outlived the process that started it"


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie of an exited child counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat_file:
            return stat_file.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_servers_started_from_another_thread_outlive_that_thread(tmp_path):
    """Linux sends the parent-death signal when the *thread* that forked ends: a server started
    from a thread pool (a fault test restarting Redis) must not die with that thread."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        server = pool.submit(start_redis, tmp_path / "redis").result()
    try:  # the pool's thread has ended
        client = redis.Redis.from_url(server.url, socket_timeout=5)
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:  # the signal would land within a moment
            assert client.ping()
            time.sleep(0.1)
        client.close()
    finally:
        server.stop()


class _ProbeSocket:
    """A socket whose ``bind(("…", 0))`` gets the next port of ``offers``: a kernel that
    offers a port again as soon as the probe closes, as it did once to a stack's gateway and
    its NATS server."""

    def __init__(self, offers: list[int]) -> None:
        self.offers = offers

    def __enter__(self) -> "_ProbeSocket":
        return self

    def __exit__(self, *_exc: object) -> None:
        pass

    def bind(self, _address: tuple[str, int]) -> None:
        self.port = self.offers.pop(0)

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)


def test_free_port_never_hands_out_a_port_twice_or_a_reserved_one(monkeypatch):
    offers = [41001, 41001, 41002, 41003, 41004]
    monkeypatch.setattr(servers.socket, "socket", lambda: _ProbeSocket(offers))
    assert servers.free_port() == 41001
    assert servers.free_port() == 41002  # the kernel offered 41001 again: skipped
    servers.reserve_port(41003)  # e.g. the gateway's --port, bound only later
    assert servers.free_port() == 41004
