"""Configuration shared by every service: validated once, at construction, from the environment.

Every setting has an embedded default so ``aegaeon up`` works with no configuration at all.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def default_state_dir() -> Path:
    """Where the embedded stack keeps demo models, server data and logs."""
    return Path(_env("AEGAEON_HOME", str(Path.home() / ".aegaeon")))


def shm_dir() -> Path:
    """Shared memory for the host model cache and KV pool (/dev/shm on Linux)."""
    default = "/dev/shm" if Path("/dev/shm").is_dir() else "/tmp"
    return Path(_env("AEGAEON_SHM_DIR", default))


@dataclass(frozen=True)
class BusConfig:
    """Where NATS and Redis are, and the subject/key prefix this deployment uses."""

    nats_url: str = field(default_factory=lambda: _env("AEGAEON_NATS_URL", "nats://127.0.0.1:4222"))
    redis_url: str = field(
        default_factory=lambda: _env("AEGAEON_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    prefix: str = field(default_factory=lambda: _env("AEGAEON_PREFIX", "aegaeon"))
    nats_user: str | None = field(default_factory=lambda: os.environ.get("AEGAEON_NATS_USER"))
    nats_password: str | None = field(
        default_factory=lambda: os.environ.get("AEGAEON_NATS_PASSWORD")
    )
    # Deployments keep the Redis password in a secret rather than in the URL (a password in
    # the URL wins over this one).
    redis_password: str | None = field(
        default_factory=lambda: os.environ.get("AEGAEON_REDIS_PASSWORD")
    )

    def __post_init__(self) -> None:
        for url in self.nats_servers:
            if not url.startswith(("nats://", "tls://", "ws://", "wss://")):
                raise ValueError(
                    f"AEGAEON_NATS_URL must be nats:// URLs (comma-separated for a cluster), "
                    f"got {self.nats_url!r}"
                )
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"AEGAEON_REDIS_URL must be a redis:// URL, got {self.redis_url!r}")
        if not self.prefix.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"AEGAEON_PREFIX must be one subject token, got {self.prefix!r}")

    @property
    def nats_servers(self) -> list[str]:
        """The NATS servers to try, in order: ``AEGAEON_NATS_URL`` may list several members of
        a cluster, comma-separated, so a service starts while any one of them is up (once
        connected, the client also learns the cluster's other members from the server)."""
        return [url.strip() for url in self.nats_url.split(",") if url.strip()]


CONNECTION_FILE = "connection.json"
"""In the state dir: the servers ``aegaeon up`` started and how this user's tools get in (0600):
Redis' URL with its password, NATS' read-only observer user (``bus_permissions``), and the
models directory it serves (:data:`MODELS_DIR_KEY`)."""

MODELS_DIR_KEY = "AEGAEON_MODELS_DIR"
"""In the connection file: the models directory the running ``aegaeon up`` serves (its
``--models-dir``, else ``<home>/models``), where ``aegaeon models add|list`` go by default."""

STACK_PID_KEY = "AEGAEON_STACK_PID"
"""In the connection file: the process id of the ``aegaeon up`` that wrote it. A file whose
process is gone (killed with -9, a reboot) was left behind, and no stack runs."""


def local_stack_env(home: Path | None = None) -> dict[str, str]:
    """The connection settings ``aegaeon up`` wrote for this user (``<home>/connection.json``:
    its servers' URLs and this run's credentials), or {} when no stack runs here."""
    import json

    path = (home or default_state_dir()) / CONNECTION_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or not _running(data.get(STACK_PID_KEY)):
        return {}
    return {k: str(v) for k, v in data.items() if k.startswith("AEGAEON_")}


def _running(pid: object) -> bool:
    """Whether the process ``pid`` (a connection file's writer) exists; True without one (a file
    of a version that recorded none)."""
    if pid is None:
        return True
    try:
        os.kill(int(str(pid)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):  # another user's process; a bad value
        return True
    return True


def local_bus_config() -> BusConfig | None:
    """The bus of the ``aegaeon up`` this user runs here (for tools such as ``aegaeon top``,
    which connect as its observer user), or None when no such stack runs."""
    local = local_stack_env()
    if "AEGAEON_NATS_URL" not in local:
        return None
    return BusConfig(
        nats_url=local["AEGAEON_NATS_URL"],
        nats_user=local.get("AEGAEON_NATS_USER"),
        nats_password=local.get("AEGAEON_NATS_PASSWORD"),
    )


def local_models_dir() -> Path | None:
    """The models directory of the ``aegaeon up`` this user runs here, or None when no such
    stack runs."""
    folder = local_stack_env().get(MODELS_DIR_KEY)
    return Path(folder) if folder else None


def default_store_id() -> str:
    """The model-store id of this node: its node name as one subject token. A worker and the
    model-store of one node (one host, one pod) share it by default, so the worker asks *its*
    node's store (``models.ensure.<id>``), whose cache paths it can map."""
    from aegaeon.subjects import host_token

    return host_token(node_name())[:64]


def node_name() -> str:
    """This host's identity (``AEGAEON_NODE``, default the host name). Workers on the same node
    share memory, so a prefill worker's exported KV can be imported by a decode worker there."""
    return _env("AEGAEON_NODE", "") or socket.gethostname()
