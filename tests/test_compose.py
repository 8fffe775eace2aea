"""docker-compose.yml and the Kubernetes manifests, checked without a Docker engine: every service
is built from the repository's Dockerfile and runs a real ``aegaeon`` command whose options the
service's own argument parser accepts."""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from aegaeon.cli import COMMANDS

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
OURS = {name: spec for name, spec in SERVICES.items() if "build" in spec}
SERVE_KINDS = {words[1] for words in COMMANDS if words[0] == "serve"}
K8S_DOCS = [
    doc
    for path in sorted((ROOT / "infra" / "k8s").glob("*.yaml"))
    for doc in yaml.safe_load_all(path.read_text())
    if doc
]


def interpolate(word: str) -> str:
    """Compose's ``${VAR:-default}`` with the variable unset; Kubernetes' ``$(VAR)`` as a value."""
    word = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", word)
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


def test_nats_runs_jetstream_with_the_password_the_services_use() -> None:
    nats = command_words(SERVICES["nats"])
    assert "--jetstream" in nats or "-js" in nats
    raw = " ".join(SERVICES["nats"]["command"])
    for name, spec in OURS.items():
        env = spec["environment"]
        assert env["AEGAEON_NATS_URL"].startswith("nats://nats:"), name
        for variable in ("AEGAEON_NATS_USER", "AEGAEON_NATS_PASSWORD"):
            assert env[variable] in raw, f"{name}: {variable} differs from the server's"


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
        names = {command_words(c)[2] for c in pod.get("containers", []) if c.get("command")}
        if "worker" in names:
            assert "model-store" in names
            shm = next(v for v in pod["volumes"] if v["name"] == "shm")
            assert shm["emptyDir"]["medium"] == "Memory"
            for container in pod["containers"]:
                assert {"name": "shm", "mountPath": "/dev/shm"} in container["volumeMounts"]
