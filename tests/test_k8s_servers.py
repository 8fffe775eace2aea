"""The servers' configs of infra/k8s run on real servers here (addresses, ports and stores moved
to each test's): nats.conf admits each role with its password only, the NATS cluster config has
three nats-server processes form a JetStream cluster, redis-start.sh requires the password and
renames dangerous commands, and runs a replica that copies its primary."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import nats
import psutil
import pytest
import redis
from k8s_render import CONFIG_MAPS, K8S, NATS_CONF, ROUTE_PASSWORD, WORKLOADS, env_value, pod_spec

from aegaeon.bus_permissions import ROLES, password_variable
from aegaeon.servers import REDIS_DISABLED_COMMANDS, free_port, server_binary

REDIS_START = K8S / "redis-start.sh"


def test_the_deployed_nats_config_admits_each_role_with_its_password_only(tmp_path):
    """infra/k8s/nats.conf on a real nats-server (address, ports and store moved to this test's),
    each role's password from the environment; its permissions hold under the default prefix."""
    port = free_port()
    conf = tmp_path / "nats.conf"  # the same file, its store in this test's folder
    conf.write_text(NATS_CONF.read_text().replace('"/data"', f'"{tmp_path / "js"}"'))
    passwords = {role: f"{role}-from-env" for role in ROLES}
    env = {**os.environ, **{password_variable(role): pw for role, pw in passwords.items()}}
    server = subprocess.Popen(
        [server_binary("nats-server"), "-c", str(conf), "-a", "127.0.0.1", "-p", str(port),
         "-m", str(free_port())],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip

    async def attempt(**credentials: Any) -> bool:
        for _ in range(600):  # until it listens (up to 30 s on a busy machine)
            try:
                nc = await nats.connect(f"nats://127.0.0.1:{port}", allow_reconnect=False,
                                        connect_timeout=2, max_reconnect_attempts=0,
                                        **credentials)  # fmt: skip
            except Exception as exc:
                if "authorization" in str(exc).lower():
                    return False
                assert server.poll() is None, "nats-server exited: the config does not load"
                await asyncio.sleep(0.05)
                continue
            await nc.close()
            return True
        raise AssertionError("nats-server did not start")

    async def worker_refusals() -> list[str]:
        """What the server refuses a worker; the last publish, refused to every role, comes
        back after the others (tests/test_bus_permissions.py)."""
        refused: list[str] = []
        barrier_refused = asyncio.Event()

        async def on_error(exc: Exception) -> None:
            refused.append(str(exc).lower())
            if "_inbox.barrier" in refused[-1]:
                barrier_refused.set()

        nc = await nats.connect(f"nats://127.0.0.1:{port}", user="worker",
                                password=passwords["worker"], error_cb=on_error)  # fmt: skip
        await nc.publish("aegaeon.requests.submit", b"forged")
        await nc.publish("aegaeon.worker.heartbeat", b"allowed")
        await nc.publish("_INBOX.barrier", b"")
        await asyncio.wait_for(barrier_refused.wait(), 10)
        await nc.close()
        return refused[:-1]

    try:
        for role, password in passwords.items():
            assert asyncio.run(attempt(user=role, password=password)), role
        assert not asyncio.run(attempt())
        assert not asyncio.run(attempt(user="worker", password=passwords["gateway"]))
        assert asyncio.run(worker_refusals()) == [
            'nats: permissions violation for publish to "aegaeon.requests.submit"'
        ]
    finally:
        server.terminate()
        server.wait(10)


def test_the_deployed_redis_start_requires_the_password_and_renames_dangerous_commands(tmp_path):
    """infra/k8s/redis-start.sh with a real redis-server (port moved to this test's)."""
    port = free_port()
    script = tmp_path / "start.sh"  # the same script, listening where this test can reach it
    script.write_text(REDIS_START.read_text().replace(
        'exec redis-server "$conf"', f'exec redis-server "$conf" --port {port} --bind 127.0.0.1'))  # fmt: skip
    path = f"{Path(server_binary('redis-server')).parent}:{os.environ['PATH']}"
    env = {**os.environ, "PATH": path, "AEGAEON_REDIS_PASSWORD": "from-env"}
    server = subprocess.Popen(["sh", str(script)], env=env, stdout=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port, password="from-env")
        for _ in range(600):  # until it listens (up to 30 s on a busy machine)
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        assert client.ping()
        with pytest.raises(redis.ResponseError, match="unknown command"):
            client.execute_command("CONFIG", "SET", "dir", "/tmp")
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).ping()
        assert "from-env" not in " ".join(psutil.Process(server.pid).cmdline())
        renamed = re.search(r"for command in ([A-Z ]+); do", REDIS_START.read_text())
        assert renamed and tuple(renamed.group(1).split()) == REDIS_DISABLED_COMMANDS
    finally:
        server.terminate()
        server.wait(10)


def _wait_json(url: str, ok: Any, seconds: float = 30.0) -> Any:
    """GET ``url`` until ``ok(json)`` holds; the last answer."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                answer = json.loads(reply.read())
            if ok(answer):
                return answer
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} never satisfied the check")
        time.sleep(0.1)


def _start_nats_server(
    folder: Path, files: dict[str, str], ports: tuple[int, int, int], env: dict[str, str]
) -> subprocess.Popen[bytes]:
    """One server of the cluster from the ConfigMap's files, its store in ``folder`` and its
    client, route and monitoring ports moved to ``ports`` (the route's in the config, not with
    ``--cluster``, which would drop the cluster block's authorization); its log in folder/log."""
    folder.mkdir()
    client, route, monitor = ports
    (folder / "nats.conf").write_text(files["nats.conf"].replace('"/data"', f'"{folder}/js"'))
    cluster = files["nats-cluster.conf"].replace("  port: 6222", f"  listen: 127.0.0.1:{route}")
    (folder / "nats-cluster.conf").write_text(cluster)
    with (folder / "log").open("wb") as log:  # the server writes to its own copy
        return subprocess.Popen(
            [server_binary("nats-server"), "-c", str(folder / "nats-cluster.conf"), "-a", "127.0.0.1",
             "-p", str(client), "-m", str(monitor)],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip


def _route_urls(server: dict[str, Any], password: str, ports: list[int]) -> dict[str, str]:
    """nats.yaml's NATS_ROUTE_<i> with ``password`` for the secret's and this machine's ports."""
    urls = {}
    for i, port in enumerate(ports):
        url = env_value(server, f"NATS_ROUTE_{i}").replace(f"$({ROUTE_PASSWORD})", password)
        urls[f"NATS_ROUTE_{i}"] = re.sub(r"@[^/]+$", f"@127.0.0.1:{port}", url)
    return urls


def test_the_nats_cluster_config_forms_a_three_server_jetstream_cluster(tmp_path: Path) -> None:
    """nats-cluster.conf and nats.conf as the ConfigMap holds them, three nats-server processes
    with the environment nats.yaml gives them (route URLs moved to this machine's ports):
    JetStream elects a leader among three peers, and a server with a wrong route password is
    refused."""
    [server] = pod_spec(WORKLOADS["nats"])["containers"]
    files = CONFIG_MAPS["nats-config"]["data"]
    ports = [(free_port(), free_port(), free_port()) for _ in range(4)]
    env = {**os.environ, ROUTE_PASSWORD: "route-secret"}
    env |= {password_variable(role): f"{role}-pw" for role in ROLES}
    routes = [route for _, route, _ in ports[:3]]
    processes = []
    try:
        for i in range(3):
            member = env | _route_urls(server, "route-secret", routes) | {"POD_NAME": f"nats-{i}"}
            processes.append(_start_nats_server(tmp_path / f"nats-{i}", files, ports[i], member))
        # Two members may elect a leader before the third (slow to start on a busy machine)
        # has joined: wait for a leader among all three, on each member.
        for _, _, monitor in ports[:3]:
            jsz = _wait_json(f"http://127.0.0.1:{monitor}/jsz",
                             lambda j: j.get("meta_cluster", {}).get("leader")
                             and j["meta_cluster"].get("cluster_size") == 3)  # fmt: skip
            assert jsz["meta_cluster"]["name"] == "aegaeon"
        rogue = env | _route_urls(server, "wrong", routes) | {"POD_NAME": "nats-rogue"}
        processes.append(_start_nats_server(tmp_path / "rogue", files, ports[3], rogue))
        logs = [tmp_path / f"nats-{i}" / "log" for i in range(3)]
        deadline = time.monotonic() + 30
        while not any("Authentication Failure" in log.read_text() for log in logs):
            assert time.monotonic() < deadline, "the members never refused the rogue's routes"
            time.sleep(0.1)
        routez = _wait_json(f"http://127.0.0.1:{ports[3][2]}/routez", lambda j: True)
        assert routez["num_routes"] == 0
        for process in processes:
            assert process.poll() is None
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(10)


def test_the_redis_start_script_runs_a_replica_that_copies_the_primary(tmp_path: Path) -> None:
    """redis-start.sh twice, as the two Deployments run it (ports moved to this test's): the
    replica authenticates to the primary, copies its writes, and refuses its own."""
    script = CONFIG_MAPS["redis-start"]["data"]["redis-start.sh"]
    [replica] = pod_spec(WORKLOADS["redis-replica"])["containers"]
    ports = free_port(), free_port()
    path = f"{Path(server_binary('redis-server')).parent}:{os.environ['PATH']}"
    env = {**os.environ, "PATH": path, "AEGAEON_REDIS_PASSWORD": "from-env"}
    replica_of = env_value(replica, "AEGAEON_REDIS_REPLICA_OF").replace("redis:", "127.0.0.1:")
    replica_of = replica_of.replace(":6379", f":{ports[0]}")
    processes = []
    try:
        for port, extra in zip(ports, ({}, {"AEGAEON_REDIS_REPLICA_OF": replica_of}), strict=True):
            start = tmp_path / f"start-{port}.sh"
            start.write_text(script.replace('exec redis-server "$conf"',
                                            f'exec redis-server "$conf" --port {port} '
                                            f'--bind 127.0.0.1 --dir {tmp_path}'))  # fmt: skip
            processes.append(subprocess.Popen(["sh", str(start)], env=env | extra,
                                              stdout=subprocess.DEVNULL))  # fmt: skip
        primary_client, replica_client = (redis.Redis(port=p, password="from-env") for p in ports)
        deadline = time.monotonic() + 30
        while True:
            try:
                primary_client.set("written", "on the primary")
                if replica_client.get("written") == b"on the primary":
                    break
            except redis.ConnectionError:
                pass
            assert time.monotonic() < deadline, "the replica never copied the primary"
            time.sleep(0.1)
        assert replica_client.info("replication")["master_link_status"] == "up"
        with pytest.raises(redis.ReadOnlyError):
            replica_client.set("written", "on the replica")
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(10)
