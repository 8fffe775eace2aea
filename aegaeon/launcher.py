"""``aegaeon up``: the whole system on this machine, as supervised child processes.

::

    aegaeon up ─┬─ nats-server (a user/role) unless AEGAEON_NATS_URL is set
                ├─ redis-server              unless AEGAEON_REDIS_URL is set
                ├─ serve model-store ─┐
                ├─ serve scheduler ×S │ each in its own process group, log in <home>/logs/,
                ├─ serve worker × N   │ restarted with exponential backoff when it crashes
                └─ serve gateway ─────┘

Every service sees ``AEGAEON_SHM_DIR=<shm>/aegaeon-up-<pid>``, so all the shared memory it uses
(host model cache, host KV pools) lies in one folder that the launcher removes at exit. Ctrl-C or
SIGTERM stops the services front to back (gateway first, model-store last: SIGTERM, then SIGKILL
after a grace period, to the whole process group), then the servers.

With ``--schedulers S`` (S ≥ 2) one scheduler leads (it holds the lease in Redis) and the others
stand by to take over; a scheduler the supervisor restarts comes back as a standby.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from aegaeon.bus_permissions import ROLES, authorization_block
from aegaeon.children import Child, die_with_parent, make_private_dir, remove_stale_shm, wait_until
from aegaeon.config import (
    CONNECTION_FILE,
    MODELS_DIR_KEY,
    STACK_PID_KEY,
    BusConfig,
    default_state_dir,
    shm_dir,
)
from aegaeon.metrics import scrape_targets
from aegaeon.servers import (
    ServerProcess,
    free_port,
    reserve_port,
    start_nats,
    start_redis,
    write_private,
)
from aegaeon.stack_plan import add_arguments as add_arguments  # `aegaeon up`'s flags, for the CLI
from aegaeon.stack_plan import plan_children, profile_path
from aegaeon.subjects import Subjects
from aegaeon.supervisor import RestartPlanner

STOP_ORDER = ("gateway", "worker", "scheduler", "model-store")
"""Front to back: stop taking requests first, remove the weights last."""
POLL_S = 0.2


# ---------------------------------------------------------------------- the stack


class Stack:
    """Servers and services of one ``aegaeon up``; ``run()`` until a signal, then ``stop()``."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.home: Path = (args.home or default_state_dir()).expanduser()
        self.logs = self.home / "logs"
        self.shm = shm_dir() / f"aegaeon-up-{os.getpid()}"
        self.servers: list[ServerProcess] = []
        self.children: list[Child] = []
        self.planner = RestartPlanner()
        self.stopping = threading.Event()
        self.env = dict(os.environ)
        self.bus_users: dict[str, dict[str, str]] = {}  # role → its NATS user and password
        self.connection_written = False  # <home>/connection.json is this run's: it goes at stop

    def say(self, text: str) -> None:
        print(text, flush=True)

    # -- start

    def start(self) -> bool:
        """Bring everything up; False when stopped (signal) before the system was ready."""
        # Files of this stack (weights, prompts' KV, logs) readable by this user only.
        os.umask(0o077)
        self.logs.mkdir(parents=True, exist_ok=True)
        remove_stale_shm(self.shm.parent)
        self.shm.parent.mkdir(parents=True, exist_ok=True)
        make_private_dir(self.shm)
        self.say(f"aegaeon up: home {self.home}, logs in {self.logs}")
        models_dir = self.resolve_models_dir()
        if models_dir is None:
            return False
        self.start_servers(models_dir)
        self.env |= {"AEGAEON_SHM_DIR": str(self.shm), "PYTHONUNBUFFERED": "1"}
        cache_bytes = self.args.cache_bytes or _default_cache_bytes()
        profile = profile_path(self.args, self.home)
        self.say(f"  profile      {profile or 'none (roofline estimates; see aegaeon profile)'}")
        self.children = plan_children(self.args, models_dir, self.logs, cache_bytes, profile)
        self.expose_metrics()
        for child in self.children:
            child.start(self.child_env(child))
            self.planner.started(child.name, time.monotonic())
            self.say(f"  {child.name:<12} started (pid {child.pid}, log {child.log_path})")
        return self.wait_ready(models_dir)

    def expose_metrics(self) -> None:
        """A free /metrics port for every service but the gateway (it serves /metrics on its
        HTTP port); printed, and written as Prometheus file-SD targets for a local Prometheus."""
        ports = {"gateway": self.args.port}
        for child in self.children:
            if child.kind != "gateway":
                ports[child.name] = free_port()
                child.argv += ["--metrics-port", str(ports[child.name])]
        targets = self.home / "prometheus-targets.json"
        targets.write_text(json.dumps(scrape_targets(ports), indent=2))
        listing = ", ".join(f"{name} :{port}" for name, port in ports.items())
        self.say(f"  metrics      /metrics of {listing} (targets in {targets})")

    def resolve_models_dir(self) -> Path | None:
        """The models to serve; on a first run with no ``--models-dir``, write the demo models."""
        if self.args.models_dir is not None:
            models_dir = self.args.models_dir.expanduser().resolve()
            if not models_dir.is_dir():
                raise SystemExit(f"aegaeon up: --models-dir {models_dir} is not a folder")
            return models_dir
        models_dir = self.home / "models"
        if not any(models_dir.glob("*/config.json")):
            self.say(f"  first run: writing demo models into {models_dir} …")
            code = self.run_foreground([sys.executable, "-m", "aegaeon.cli", "models", "create-demo", str(models_dir)])  # fmt: skip
            if code != 0:
                if self.stopping.is_set():
                    return None
                raise SystemExit(f"aegaeon up: creating demo models failed (exit {code})")
        return models_dir

    def run_foreground(self, argv: list[str]) -> int:
        """Run a one-off child (its output on our terminal), interruptible by our stop signal."""
        proc = subprocess.Popen(argv, start_new_session=True, preexec_fn=die_with_parent)
        while proc.poll() is None:
            if self.stopping.wait(POLL_S):
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait()
        return proc.returncode

    def start_servers(self, models_dir: Path | None = None) -> None:
        """Embedded NATS and Redis, unless the environment points at existing ones. Each gets
        credentials made for this run (another local user's client is refused); on NATS, one
        user per role (``bus_permissions``), each service getting only its own. And
        ``<home>/connection.json`` (0600) tells this user's tools (``aegaeon top``) where they
        are and how to get in (as the read-only observer), and ``aegaeon models add|list`` which
        ``models_dir`` the stack serves; it goes when the stack stops."""
        connection: dict[str, str] = {}
        if "AEGAEON_NATS_URL" in os.environ:
            self.say(f"  nats         {os.environ['AEGAEON_NATS_URL']} (existing)")
        else:
            passwords = {role: secrets.token_urlsafe(24) for role in ROLES}
            authorization = authorization_block(passwords, Subjects(BusConfig().prefix))
            nats = start_nats(self.home / "nats", log_file=self.logs / "nats.log", authorization=authorization)  # fmt: skip
            self.servers.append(nats)
            self.bus_users = {role: {"AEGAEON_NATS_USER": role, "AEGAEON_NATS_PASSWORD": password}
                              for role, password in passwords.items()}  # fmt: skip
            connection |= {"AEGAEON_NATS_URL": nats.url, **self.bus_users["observer"]}
            self.say(f"  nats-server  {nats.url} (a user per service, passwords of this run, pid {nats.process.pid})")  # fmt: skip
        if "AEGAEON_REDIS_URL" in os.environ:
            self.say(f"  redis        {os.environ['AEGAEON_REDIS_URL']} (existing)")
        else:
            redis = start_redis(self.home / "redis", log_file=self.logs / "redis.log",
                                password=secrets.token_urlsafe(24))  # fmt: skip
            self.servers.append(redis)
            connection["AEGAEON_REDIS_URL"] = redis.url
            self.say(f"  redis-server 127.0.0.1:{redis.port} (password of this run, pid {redis.process.pid})")  # fmt: skip
        # Every service gets the URLs (Redis' carries its password); NATS users go per service.
        self.env |= {k: v for k, v in connection.items() if k.endswith("_URL")}
        if models_dir is not None:
            connection[MODELS_DIR_KEY] = str(models_dir.absolute())  # read from any folder
        if connection:
            # Its writer's pid: a file left by a killed run reads as no stack (config._running).
            connection[STACK_PID_KEY] = str(os.getpid())
            write_private(self.home / CONNECTION_FILE, json.dumps(connection, indent=2))
            self.connection_written = True

    def child_env(self, child: Child) -> dict[str, str]:
        """The environment of one service: the stack's, and the NATS user of its role when the
        stack started its own NATS (else whatever credentials the environment gave)."""
        return self.env | self.bus_users.get(child.kind, {})

    def wait_ready(self, models_dir: Path) -> bool:
        """Supervise while waiting for the gateway's /health; print the endpoint once it is 200."""
        host = "127.0.0.1" if self.args.host in ("0.0.0.0", "::", "") else self.args.host
        url = f"http://{host}:{self.args.port}"
        deadline = time.monotonic() + self.args.ready_timeout
        self.say(f"  waiting for {url}/health …")
        while not self.stopping.wait(POLL_S):
            self.supervise_once()
            if _healthy(url + "/health"):
                self.say(ready_banner(url, _model_names(models_dir)))
                return True
            if time.monotonic() > deadline:
                self.say(f"  /health not ready after {self.args.ready_timeout:.0f} s; see {self.logs}")  # fmt: skip
                deadline = float("inf")
        return False

    # -- supervise

    def supervise_once(self) -> None:
        """Note children that exited, restart those whose backoff has elapsed."""
        now = time.monotonic()
        for child in self.children:
            code = child.exit_code()
            if code is not None and not self.planner.waiting(child.name):
                child.signal_group(signal.SIGKILL)  # anything it left behind in its group
                child.close_log()
                delay = self.planner.exited(child.name, now)
                self.say(f"  {child.name} exited with code {code}; restarting in {delay:.1f} s (log {child.log_path})")  # fmt: skip
        for name in self.planner.due(now):
            child = next(c for c in self.children if c.name == name)
            child.start(self.child_env(child))
            self.planner.started(name, now)
            self.say(f"  {name} restarted (pid {child.pid})")

    def run(self) -> None:
        """Supervise until a signal."""
        while not self.stopping.wait(POLL_S):
            self.supervise_once()

    # -- stop

    def stop(self) -> None:
        """Stop services front to back, then the servers; remove our shared memory."""
        for kind in STOP_ORDER:
            tier = [c for c in self.children if c.kind == kind]
            for child in tier:
                child.signal_group(signal.SIGTERM)
            deadline = time.monotonic() + self.args.grace
            for child in tier:
                wait_until(child, deadline)
                child.signal_group(signal.SIGKILL)  # the leader's leftovers, or a stuck leader
                if child.process is not None:
                    child.process.wait()
                child.wait_group_gone()
                child.close_log()
        for server in reversed(self.servers):
            server.stop()
        if self.connection_written:
            (self.home / CONNECTION_FILE).unlink(missing_ok=True)
        shutil.rmtree(self.shm, ignore_errors=True)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return response.status == 200
    except OSError:
        return False


def _model_names(models_dir: Path) -> list[str]:
    return sorted(p.parent.name for p in models_dir.glob("*/config.json"))


def _default_cache_bytes() -> int:
    from aegaeon.model_store.main import default_cache_bytes

    return default_cache_bytes()


def ready_banner(url: str, models: list[str]) -> str:
    """What the user sees once the system answers: the endpoint and a request to paste."""
    model = models[0] if models else "MODEL"
    body = json.dumps({"model": model, "stream": True, "max_tokens": 32,
                       "messages": [{"role": "user", "content": "Hello!"}]})  # fmt: skip
    return "\n".join([
        "",
        f"Aegaeon is up: {url}/v1 (OpenAI-compatible), {len(models)} models: {', '.join(models)}",
        "",
        f"  curl -N {url}/v1/chat/completions -H 'Content-Type: application/json' \\",
        f"       -d '{body}'",
        f"  curl {url}/v1/models",
        "",
        "Ctrl-C stops everything.",
    ])  # fmt: skip


def _port_free(host: str, port: int) -> bool:
    """No one listens on the port. Address reuse, as the gateway's own bind uses: connections of
    a stack stopped a moment ago linger in TIME_WAIT and must not block a restart."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def gateway_refusal(args: argparse.Namespace) -> str | None:
    """The gateway's own start-up check (keys file, open access off loopback), run here first."""
    from aegaeon.gateway.main import startup_refusal
    from aegaeon.gateway.settings import GatewaySettings

    try:
        settings = GatewaySettings(bus=BusConfig())
    except ValueError as exc:  # a setting in the environment the gateway would refuse
        return str(exc)
    return startup_refusal(settings, args.host, getattr(args, "insecure_open", False))


def main(args: argparse.Namespace) -> int:
    """Run the stack until Ctrl-C / SIGTERM; leave no process and no shared memory behind."""
    if args.workers < 1 or args.schedulers < 1:
        print("aegaeon up: --workers and --schedulers must be at least 1", file=sys.stderr)
        return 2
    refusal = gateway_refusal(args)
    if refusal is not None:  # before anything starts: the gateway would only crash-loop on it
        print(f"aegaeon up: {refusal}", file=sys.stderr)
        return 2
    if not _port_free(args.host, args.port):
        print(f"aegaeon up: port {args.port} is in use; pick another with --port", file=sys.stderr)
        return 1
    reserve_port(args.port)  # the gateway binds it only later: no server started first may take it
    stack = Stack(args)

    def on_signal(signum: int, _frame: object) -> None:
        stack.stopping.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    code = 0
    try:
        if stack.start():
            stack.run()
        stack.say("\naegaeon up: stopping …")
    except (OSError, RuntimeError, TimeoutError) as exc:  # a server or service could not start
        print(f"aegaeon up: {exc}; stopping (logs in {stack.logs})", file=sys.stderr)
        code = 1
    finally:
        stack.stop()
    stack.say("aegaeon up: stopped")
    return code
