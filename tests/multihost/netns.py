"""Hosts on one machine, for the multi-host test: each host is a network namespace with its own
address on one bridge, and a mount namespace of its own with a private ``/dev/shm`` (a tmpfs), so
two hosts share neither loopback, ports nor shared memory::

        driver (10.88.0.1, on the bridge)
          │ br0
          ├── veth ── host n1 10.88.0.11        each: ip netns + a holder process whose mount
          ├── veth ── host n2 10.88.0.12        namespace has its own tmpfs /dev/shm; the host's
          └── …                                 processes run in both (nsenter)

Everything here must run inside a private network, mount and PID namespace (``unshare --net
--mount --pid --fork --mount-proc``, as :func:`isolated_command` builds it): the bridge, the
addresses and ``/run/netns`` then exist only there, and when the driver (PID 1 of that namespace)
ends, the kernel kills every process it started and the namespaces and tmpfs go with them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from aegaeon.children import die_with_parent

SUBNET = "10.88.0"
BRIDGE = "br0"
DRIVER_ADDRESS = f"{SUBNET}.1"


def namespaces_available() -> str | None:
    """None when this machine can build the hosts (``unshare``, ``nsenter``, ``ip`` present and
    a private network namespace can hold a bridge), else why not."""
    for tool in ("unshare", "nsenter", "ip"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    probe = subprocess.run(
        [*isolated_command(), "sh", "-c", f"ip link add {BRIDGE} type bridge"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    if probe.returncode != 0:
        return f"this kernel or user may not create network namespaces: {probe.stderr.strip()}"
    return None


def isolated_command() -> list[str]:
    """The prefix that runs a command as PID 1 of private network, mount and PID namespaces
    (mapped to root in a user namespace when not already root)."""
    command = ["unshare", "--net", "--mount", "--pid", "--fork", "--mount-proc", "--kill-child"]
    if os.geteuid() != 0:
        command.append("--map-root-user")
    return command


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


@dataclass
class Host:
    """One host: its address, the holder process that keeps its mount namespace (its /dev/shm),
    and the processes started on it by name."""

    name: str
    address: str
    holder: subprocess.Popen
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def spawn(
        self, name: str, argv: list[str], env: dict[str, str], logs: Path
    ) -> subprocess.Popen:
        """Start ``argv`` on this host (its network and mount namespaces), output in
        ``logs/<host>-<name>.log``."""
        command = ["nsenter", f"--target={self.holder.pid}", "--mount", "--net", "--", *argv]
        with (logs / f"{self.name}-{name}.log").open("ab") as log:
            process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True, preexec_fn=die_with_parent)  # fmt: skip
        self.processes[name] = process
        return process

    def kill(self, name: str) -> None:
        """SIGKILL one process of this host (a crash, not a shutdown)."""
        process = self.processes[name]
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)

    def crash(self) -> None:
        """The host dies: SIGKILL every process on it, then its holder (its /dev/shm goes)."""
        for name in list(self.processes):
            self.kill(name)
        self.holder.kill()
        self.holder.wait(10)

    def stop(self) -> None:
        """SIGTERM every process (a clean shutdown), SIGKILL what is left after 15 s."""
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for process in self.processes.values():
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
        if self.holder.poll() is None:
            self.holder.kill()
            self.holder.wait(10)


class Network:
    """The bridge and the hosts on it (call inside :func:`isolated_command`'s namespaces)."""

    def __init__(self) -> None:
        # ip netns keeps its handles in /run/netns: a tmpfs private to this mount namespace
        Path("/run/netns").mkdir(parents=True, exist_ok=True)
        run("mount", "-t", "tmpfs", "netns", "/run/netns")
        run("ip", "link", "set", "lo", "up")
        run("ip", "link", "add", BRIDGE, "type", "bridge")
        run("ip", "addr", "add", f"{DRIVER_ADDRESS}/24", "dev", BRIDGE)
        run("ip", "link", "set", BRIDGE, "up")
        self.hosts: dict[str, Host] = {}

    def add_host(self, name: str, octet: int, shm_bytes: int = 64 << 20) -> Host:
        """A host at ``SUBNET.octet`` with a tmpfs /dev/shm of ``shm_bytes``."""
        address = f"{SUBNET}.{octet}"
        run("ip", "netns", "add", name)
        run("ip", "link", "add", f"v{octet}", "type", "veth", "peer", "name", "eth0", "netns", name)
        run("ip", "link", "set", f"v{octet}", "master", BRIDGE, "up")
        run("ip", "-n", name, "addr", "add", f"{address}/24", "dev", "eth0")
        run("ip", "-n", name, "link", "set", "eth0", "up")
        run("ip", "-n", name, "link", "set", "lo", "up")
        mount_shm = f"mount -t tmpfs -o size={shm_bytes} shm /dev/shm && exec sleep infinity"
        holder = subprocess.Popen(
            ["ip", "netns", "exec", name, "unshare", "--mount", "--propagation", "private",
             "sh", "-c", mount_shm],
            start_new_session=True, preexec_fn=die_with_parent,
        )  # fmt: skip
        host = Host(name, address, holder)
        self._wait_for_shm(host)
        self.hosts[name] = host
        return host

    @staticmethod
    def _wait_for_shm(host: Host) -> None:
        """Until the holder's tmpfs is mounted (its own /dev/shm differs from ours)."""
        ours = os.stat("/dev/shm").st_dev
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if host.holder.poll() is not None:
                raise RuntimeError(
                    f"host {host.name}: the holder exited ({host.holder.returncode})"
                )
            try:
                if os.stat(f"/proc/{host.holder.pid}/root/dev/shm").st_dev != ours:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"host {host.name}: /dev/shm was not mounted in 10 s")

    def stop(self) -> None:
        """Stop the hosts, the last added first (services before the servers they use)."""
        for host in reversed(list(self.hosts.values())):
            host.stop()
