"""docker-compose.yml and the Kubernetes manifests, checked without a Docker engine: every service
is built from the repository's Dockerfile and runs a real ``aegaeon`` command whose options the
service's own argument parser accepts; no secret is committed; the NATS config and the Redis
start script they share run on real servers here."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import re
import shlex
import subprocess
import time
import tomllib
from pathlib import Path
from typing import Any

import nats
import psutil
import pytest
import redis
import yaml

from aegaeon.cli import COMMANDS
from aegaeon.servers import REDIS_DISABLED_COMMANDS, _binary, free_port

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
OURS = {name: spec for name, spec in SERVICES.items() if "build" in spec}
SERVE_KINDS = {words[1] for words in COMMANDS if words[0] == "serve"}
NATS_CONF = ROOT / "infra" / "k8s" / "nats.conf"
REDIS_START = ROOT / "infra" / "k8s" / "redis-start.sh"
K8S_DOCS = [
    doc
    for path in sorted((ROOT / "infra" / "k8s").glob("*.yaml"))
    for doc in yaml.safe_load_all(path.read_text())
    if doc
]


def interpolate(word: str) -> str:
    """Compose's ``${VAR:-default}`` with the variable unset, ``${VAR:?why}`` (required) as
    ``<VAR>``; Kubernetes' ``$(VAR)`` as a value."""
    word = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", word)
    word = re.sub(r"\$\{([A-Z_]+):\?[^}]*\}", r"<\1>", word)
    return re.sub(r"\$\([A-Z_]+\)", "x", word)


def command_words(spec: dict[str, Any]) -> list[str]:
    command = spec["command"]
    words = shlex.split(command) if isinstance(command, str) else list(command)
    return [interpolate(str(w)) for w in words]


def check_aegaeon_command(words: list[str]) -> tuple[str, ...]:
    """The command is ``aegaeon <words…>`` from the CLI's table, and its module accepts the rest."""
    assert words[0] == "aegaeon", words
    for length in (2, 1):
        key = tuple(words[1 : 1 + length])
        if key in COMMANDS:
            break
    else:
        pytest.fail(f"{words} is not an `aegaeon` command")
    module = importlib.import_module(COMMANDS[key][0])
    parser = argparse.ArgumentParser(exit_on_error=False)
    if hasattr(module, "add_arguments_for"):
        module.add_arguments_for(key, parser)
    else:
        module.add_arguments(parser)
    parser.parse_args(words[1 + len(key) :])  # raises on an option the service does not have
    return key


# ---------------------------------------------------------------- compose


def test_every_aegaeon_service_is_built_from_the_repository_dockerfile() -> None:
    assert {"model-store", "scheduler", "gateway", "gpu-worker"} <= set(OURS)
    for name, spec in OURS.items():
        build = spec["build"]
        context = ROOT / build["context"]
        assert context.resolve() == ROOT, name
        assert (context / build.get("dockerfile", "Dockerfile")).is_file(), name


@pytest.mark.parametrize("name", sorted(OURS))
def test_every_service_command_is_a_real_entry_point(name: str) -> None:
    key = check_aegaeon_command(command_words(OURS[name]))
    if OURS[name].get("restart") != "no":
        assert key[0] == "serve", f"{name} is long-running, so it must be `aegaeon serve …`"


def test_compose_runs_every_kind_of_service() -> None:
    kinds = {command_words(spec)[2] for spec in OURS.values() if command_words(spec)[1] == "serve"}
    assert kinds == SERVE_KINDS


def _device(spec: dict[str, Any]) -> str:
    words = command_words(spec)
    return words[words.index("--device") + 1]


def test_the_default_worker_is_on_cpu_and_the_cuda_worker_needs_the_gpu_profile() -> None:
    workers = {n: s for n, s in OURS.items() if command_words(s)[1:3] == ["serve", "worker"]}
    cpu = [n for n, s in workers.items() if _device(s) == "cpu"]
    cuda = [n for n, s in workers.items() if _device(s).startswith("cuda")]
    assert cpu and cuda
    for name in cpu:
        assert not workers[name].get("profiles"), f"{name} must start by default"
    for name in cuda:
        spec = workers[name]
        assert spec.get("profiles") == ["gpu"]
        devices = spec["deploy"]["resources"]["reservations"]["devices"]
        assert any("gpu" in d["capabilities"] for d in devices)
        assert "cu" in spec["build"]["args"]["TORCH_INDEX_URL"]


def test_nats_runs_jetstream_with_the_credentials_the_services_use() -> None:
    nats = SERVICES["nats"]
    assert command_words(nats) == ["-c", "/etc/nats/nats.conf"]
    assert "./infra/k8s/nats.conf:/etc/nats/nats.conf:ro" in nats["volumes"]
    conf = NATS_CONF.read_text()
    assert "jetstream" in conf and "$AEGAEON_NATS_USER" in conf and "$AEGAEON_NATS_PASSWORD" in conf
    for name, spec in OURS.items():
        env = spec["environment"]
        assert env["AEGAEON_NATS_URL"].startswith("nats://nats:"), name
        for variable in ("AEGAEON_NATS_USER", "AEGAEON_NATS_PASSWORD"):
            assert env[variable] == nats["environment"][variable], f"{name}: {variable}"


def test_redis_requires_the_password_the_services_use() -> None:
    redis = SERVICES["redis"]
    assert command_words(redis) == ["sh", "/etc/redis/redis-start.sh"]
    assert "./infra/k8s/redis-start.sh:/etc/redis/redis-start.sh:ro" in redis["volumes"]
    password = redis["environment"]["AEGAEON_REDIS_PASSWORD"]
    assert redis["environment"]["REDISCLI_AUTH"] == password  # the healthcheck's redis-cli
    for name, spec in OURS.items():
        assert spec["environment"]["AEGAEON_REDIS_PASSWORD"] == password, name


def test_compose_commits_no_secret_and_publishes_only_on_loopback() -> None:
    """Every password is a required variable (``make compose-env`` writes them to .env);
    every published port binds 127.0.0.1."""
    for name, spec in SERVICES.items():
        env = spec.get("environment") or {}
        for variable, value in env.items():
            if "PASSWORD" in variable or variable == "REDISCLI_AUTH":
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", str(value)), (name, variable)
        for port in spec.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)


def test_workers_share_the_model_stores_sized_shared_memory() -> None:
    store = OURS["model-store"]
    assert store["ipc"] == "shareable" and interpolate(store["shm_size"]).endswith(
        ("gb", "g", "GB")
    )
    for name, spec in OURS.items():
        if command_words(spec)[1:3] == ["serve", "worker"]:
            assert spec["ipc"] == "service:model-store", name


def test_traces_go_to_the_collector_with_the_repository_config() -> None:
    collector = SERVICES["otel-collector"]
    assert collector["image"].startswith("otel/opentelemetry-collector")
    mount = next(v for v in collector["volumes"] if "otel-collector.yaml" in v)
    host_path = ROOT / mount.split(":")[0]
    config = yaml.safe_load(host_path.read_text())
    assert "otlp" in config["receivers"] and config["service"]["pipelines"]["traces"]
    for name, spec in OURS.items():
        assert spec["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith(
            "http://otel-collector:"
        ), name


def test_the_image_installs_every_package_folder() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    ignored = (ROOT / ".dockerignore").read_text().split()
    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"
    ]
    for folder in {path.split("/")[0] for path in package_dirs.values()}:
        assert re.search(rf"^COPY .*\b{folder}\b", dockerfile, re.M), folder
        assert folder not in ignored
    assert re.search(r"^RUN pip install \.", dockerfile, re.M)


# ---------------------------------------------------------------- kubernetes


def _containers() -> list[dict[str, Any]]:
    found = []
    for doc in K8S_DOCS:
        pod = doc.get("spec", {}).get("template", {}).get("spec", {})
        found += pod.get("containers", [])
    return found


def test_kubernetes_manifests_run_real_entry_points() -> None:
    ours = [c for c in _containers() if c["image"] == "aegaeon"]
    kinds = {check_aegaeon_command(command_words(c))[1] for c in ours}
    assert kinds == SERVE_KINDS


def test_kubernetes_workers_share_shared_memory_with_their_model_store() -> None:
    for doc in K8S_DOCS:
        pod = doc.get("spec", {}).get("template", {}).get("spec", {})
        names = {command_words(c)[2] for c in pod.get("containers", []) if c["image"] == "aegaeon"}
        if "worker" in names:
            assert "model-store" in names
            shm = next(v for v in pod["volumes"] if v["name"] == "shm")
            assert shm["emptyDir"]["medium"] == "Memory"
            for container in pod["containers"]:
                assert {"name": "shm", "mountPath": "/dev/shm"} in container["volumeMounts"]


def test_kubernetes_commits_no_secret_and_every_bus_user_reads_the_bus_secret() -> None:
    assert not [d for d in K8S_DOCS if d["kind"] == "Secret"]
    for container in _containers():
        if container["image"] == "aegaeon" or container["name"] in ("nats", "redis"):
            refs = [
                r["secretRef"]["name"] for r in container.get("envFrom", []) if "secretRef" in r
            ]
            assert refs == ["aegaeon-bus"], container["name"]


def test_kubernetes_admits_clients_at_the_gateway_only():
    policies = {d["metadata"]["name"]: d["spec"] for d in K8S_DOCS if d["kind"] == "NetworkPolicy"}
    deny = policies.pop("default-deny-ingress")
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress"]}
    open_to_all = [p["podSelector"] for p in policies.values()
                   if any("from" not in rule for rule in p["ingress"])]  # fmt: skip
    assert open_to_all == [{"matchLabels": {"app": "gateway"}}]
    kustomization = yaml.safe_load((ROOT / "infra" / "k8s" / "kustomization.yaml").read_text())
    assert "network-policy.yaml" in kustomization["resources"]
    generated = {g["name"]: g["files"] for g in kustomization["configMapGenerator"]}
    assert generated == {"nats-config": ["nats.conf"], "redis-start": ["redis-start.sh"]}


# ---------------------------------------------------------------- the servers' own settings


def test_the_deployed_nats_config_refuses_clients_without_the_credentials(tmp_path):
    """infra/k8s/nats.conf on a real nats-server (address, ports and store moved to this test's)."""
    port = free_port()
    conf = tmp_path / "nats.conf"  # the same file, its store in this test's folder
    conf.write_text(NATS_CONF.read_text().replace('"/data"', f'"{tmp_path / "js"}"'))
    env = {**os.environ, "AEGAEON_NATS_USER": "aegaeon", "AEGAEON_NATS_PASSWORD": "from-env"}
    server = subprocess.Popen(
        [_binary("nats-server"), "-c", str(conf), "-a", "127.0.0.1", "-p", str(port),
         "-m", str(free_port())],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip

    async def attempt(**credentials: str) -> bool:
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

    try:
        assert asyncio.run(attempt(user="aegaeon", password="from-env"))
        assert not asyncio.run(attempt())
        assert not asyncio.run(attempt(user="aegaeon", password="guess"))
    finally:
        server.terminate()
        server.wait(10)


def test_the_deployed_redis_start_requires_the_password_and_renames_dangerous_commands(tmp_path):
    """infra/k8s/redis-start.sh with a real redis-server (port moved to this test's)."""
    port = free_port()
    script = tmp_path / "start.sh"  # the same script, listening where this test can reach it
    script.write_text(REDIS_START.read_text().replace(
        'exec redis-server "$conf"', f'exec redis-server "$conf" --port {port} --bind 127.0.0.1'))  # fmt: skip
    path = f"{Path(_binary('redis-server')).parent}:{os.environ['PATH']}"
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
