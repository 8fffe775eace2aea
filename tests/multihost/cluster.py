"""Aegaeon across hosts (:mod:`netns`): a three-server NATS cluster, Redis, a control host with
the scheduler and the gateway, and worker hosts each running a model-store and a CPU gpu-worker
on their own shared memory. Only the test network's addresses are used."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from netns import Host, Network

from aegaeon.servers import server_binary

NATS_HOSTS = {"nats-1": 11, "nats-2": 12, "nats-3": 13}
REDIS_HOST, REDIS_OCTET = "state", 20
CONTROL_HOST, CONTROL_OCTET = "control", 30
CLIENT_PORT, ROUTE_PORT, MONITOR_PORT, GATEWAY_PORT = 4222, 6222, 8222, 8000
KV_TRANSFER_PORT, WEIGHTS_TRANSFER_PORT = 7400, 7401
PREFIX = "multihost"
GATEWAY_ID = "gw-mh"
ARENA_BYTES = 1 << 29


@dataclass
class WorkerHost:
    host: Host
    node: str
    worker_id: str


class Cluster:
    """Start with :meth:`start`; :meth:`stop` ends every host cleanly."""

    def __init__(self, network: Network, models_dir: Path, work: Path) -> None:
        self.network, self.models_dir, self.work = network, models_dir, work
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.nats: dict[str, Host] = {}
        self.workers: dict[str, WorkerHost] = {}

    # ------------------------------------------------------------------ addresses

    @property
    def nats_url(self) -> str:
        """Every member, comma-separated (``AEGAEON_NATS_URL``): a client starts on any one."""
        return ",".join(f"nats://{h.address}:{CLIENT_PORT}" for h in self.nats.values())

    @property
    def gateway_url(self) -> str:
        return f"http://{self.network.hosts[CONTROL_HOST].address}:{GATEWAY_PORT}"

    def env(self, node: str) -> dict[str, str]:
        return {
            **os.environ,
            "AEGAEON_NATS_URL": self.nats_url,
            "AEGAEON_REDIS_URL": f"redis://{self.network.hosts[REDIS_HOST].address}:6379/0",
            "AEGAEON_PREFIX": PREFIX,
            "AEGAEON_NODE": node,
            "AEGAEON_SHM_DIR": "/dev/shm",  # the host's own tmpfs
            "AEGAEON_HOME": str(self.work / "home" / node),
            "OTEL_TRACES_EXPORTER": "none",
        }

    # ------------------------------------------------------------------ start

    def start(
        self,
        worker_nodes: list[str],
        roles: dict[str, str] | None = None,
        transfers: bool = False,
    ) -> None:
        """``roles``: a worker host → its worker's role (default both); ``transfers``: each
        worker serves exported KV, and each model-store its cached weights, to the other hosts
        from its own address."""
        for name, octet in NATS_HOSTS.items():
            self.nats[name] = self.network.add_host(name, octet)
        routes = ",".join(f"nats://{h.address}:{ROUTE_PORT}" for h in self.nats.values())
        for name, host in self.nats.items():
            host.spawn("nats-server", [
                server_binary("nats-server"), "-a", host.address, "-p", str(CLIENT_PORT),
                "-m", str(MONITOR_PORT), "-n", name, "--cluster_name", "aegaeon",
                "--cluster", f"nats://{host.address}:{ROUTE_PORT}", "--routes", routes,
                "-js", "-sd", str(self.work / name),
            ], os.environ.copy(), self.logs)  # fmt: skip
        for host in self.nats.values():
            wait_json(f"http://{host.address}:{MONITOR_PORT}/routez",
                      lambda r: r.get("num_routes", 0) >= len(self.nats) - 1, 30)  # fmt: skip
        state = self.network.add_host(REDIS_HOST, REDIS_OCTET)
        state.spawn("redis-server", [
            server_binary("redis-server"), "--bind", state.address, "--port", "6379", "--save", "",
            "--appendonly", "no", "--protected-mode", "no", "--dir", str(self.work),
        ], os.environ.copy(), self.logs)  # fmt: skip
        wait_port(state.address, 6379, 20)
        control = self.network.add_host(CONTROL_HOST, CONTROL_OCTET)
        env = self.env(CONTROL_HOST)
        control.spawn("scheduler", serve("scheduler", "--scheduler-id", "sched-0"), env, self.logs)
        control.spawn("gateway", serve("gateway", "--host", control.address, "--port",
                                       str(GATEWAY_PORT), "--gateway-id", GATEWAY_ID,
                                       "--insecure-open"), env, self.logs)  # fmt: skip
        for index, node in enumerate(worker_nodes):
            host = self.network.add_host(node, 41 + index, shm_bytes=768 << 20)
            env = self.env(node)
            store = ["--models-dir", str(self.models_dir), "--cache-bytes", str(512 << 20)]
            if transfers:
                store += ["--weights-transfer-address", f"{host.address}:{WEIGHTS_TRANSFER_PORT}"]
            host.spawn("model-store", serve("model-store", *store), env, self.logs)
            worker_id = f"w-{node}"
            argv = ["--worker-id", worker_id, "--threads", "1", "--arena-bytes", str(ARENA_BYTES),
                    "--role", (roles or {}).get(node, "both")]  # fmt: skip
            if transfers:
                argv += ["--kv-transfer-address", f"{host.address}:{KV_TRANSFER_PORT}"]
            host.spawn("worker", serve("worker", *argv), env, self.logs)
            self.workers[node] = WorkerHost(host, node, worker_id)
        wait_json(f"{self.gateway_url}/health", lambda h: True, 90)

    def connections_of(self, name: str) -> str | None:
        """The NATS member a client named ``name`` is connected to now (None: none)."""
        for member, host in self.nats.items():
            if host.processes["nats-server"].poll() is not None:
                continue
            connz = read_json(f"http://{host.address}:{MONITOR_PORT}/connz?limit=1024")
            if any(c.get("name") == name for c in (connz or {}).get("connections", [])):
                return member
        return None

    def stop(self) -> None:
        self.network.stop()

    def exited(self) -> list[str]:
        """Processes that ended by themselves (the test's crashes are SIGKILLs)."""
        return [f"{host.name}/{name}" for host in self.network.hosts.values()
                for name, p in host.processes.items()
                if p.poll() is not None and p.returncode != -signal.SIGKILL]  # fmt: skip


def serve(service: str, *argv: str) -> list[str]:
    return [sys.executable, "-m", "aegaeon.cli", "serve", service, *argv]


def read_json(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return json.loads(reply.read())
    except (OSError, ValueError):
        return None


def wait_json(url: str, ok, seconds: float) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        answer = read_json(url)
        if answer is not None and ok(answer):
            return answer
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer as expected in {seconds} s")
        time.sleep(0.2)


def wait_port(address: str, port: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with socket.create_connection((address, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
