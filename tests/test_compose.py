"""docker-compose.yml and the Kubernetes manifests, checked without a Docker engine: every service
is built from the repository's Dockerfile and runs a real ``aegaeon`` command whose options the
service's own argument parser accepts; no secret is committed. The NATS config and the Redis
start script they share run on real servers in test_k8s_servers.py."""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
import subprocess
import tomllib
from typing import Any

import pytest
import yaml
from k8s_render import K8S, KUSTOMIZATION, NATS_CONF, ROOT, ROUTE_PASSWORD, pod_spec

from aegaeon.bus_permissions import ROLES, deployed_authorization_block, password_variable
from aegaeon.cli import COMMANDS

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
OURS = {name: spec for name, spec in SERVICES.items() if "build" in spec}
SERVE_KINDS = {words[1] for words in COMMANDS if words[0] == "serve"}
K8S_DOCS = [  # the manifests' objects as written (tests/test_k8s_manifests.py renders them)
    doc
    for resource in KUSTOMIZATION["resources"]
    for doc in yaml.safe_load_all((K8S / resource).read_text())
    if doc
]
AEGAEON_IMAGES = {"aegaeon", "aegaeon-cuda"}  # kustomization.yaml's `images:` map them


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


def test_compose_runs_two_schedulers_that_share_one_leader_lease() -> None:
    scheduler = OURS["scheduler"]
    assert scheduler["deploy"]["replicas"] >= 2
    ttl = command_words(scheduler)[command_words(scheduler).index("--lease-ttl") + 1]
    assert float(ttl) > 0  # without a lease each replica would schedule on its own
    assert "--scheduler-id" not in command_words(scheduler)  # each takes its host name


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


NATS_PASSWORDS = {password_variable(role) for role in ROLES}


def _role(words: list[str]) -> str | None:
    """The NATS role of ``aegaeon serve <kind>`` (its kind), None for a one-off command."""
    return words[2] if words[1] == "serve" else None


def test_the_deployed_nats_config_holds_the_users_bus_permissions_defines() -> None:
    conf = NATS_CONF.read_text()
    assert "jetstream" in conf
    assert deployed_authorization_block() in conf, "regenerate: python -m aegaeon.bus_permissions"
    blocks = [line for line in conf.splitlines() if line.startswith("authorization")]
    assert blocks == ["authorization {"]  # no other block, which would override it


def test_nats_runs_jetstream_with_a_user_per_role_and_each_service_gets_only_its_own() -> None:
    nats = SERVICES["nats"]
    assert command_words(nats) == ["-c", "/etc/nats/nats.conf"]
    assert "./infra/k8s/nats.conf:/etc/nats/nats.conf:ro" in nats["volumes"]
    assert set(nats["environment"]) == NATS_PASSWORDS
    for variable, value in nats["environment"].items():
        assert value.startswith(f"${{{variable}:?"), variable  # .env's variable of that name
    for name, spec in OURS.items():
        env = spec["environment"]
        assert env["AEGAEON_NATS_URL"].startswith("nats://nats:"), name
        role = _role(command_words(spec))
        held = [v for v in NATS_PASSWORDS if f"${{{v}:" in " ".join(map(str, env.values()))]
        if role is None:  # models-init writes files and never touches the bus
            assert "AEGAEON_NATS_PASSWORD" not in env and held == [], name
            continue
        assert env["AEGAEON_NATS_USER"] == role, name
        assert env["AEGAEON_NATS_PASSWORD"] == nats["environment"][password_variable(role)], name
        assert held == [password_variable(role)], name


def test_make_compose_env_generates_every_password_compose_requires(tmp_path) -> None:
    """Into a private .env; a second run keeps it, and an older .env gains what it lacks."""
    text = (ROOT / "docker-compose.yml").read_text()
    required = set(re.findall(r"\$\{([A-Z_]+):\?", text))
    assert required >= NATS_PASSWORDS

    def compose_env() -> dict[str, str]:
        subprocess.run(["make", "-s", "-f", str(ROOT / "Makefile"), "compose-env"], cwd=tmp_path,
                       check=True, capture_output=True)  # fmt: skip
        lines = (tmp_path / ".env").read_text().splitlines()
        return dict(line.split("=", 1) for line in lines)

    generated = compose_env()
    assert set(generated) == required
    assert len(set(generated.values())) == len(generated)
    assert all(re.fullmatch(r"[0-9a-f]{32}", v) for v in generated.values())
    assert oct((tmp_path / ".env").stat().st_mode & 0o777) == "0o600"
    assert compose_env() == generated
    (tmp_path / ".env").write_text("AEGAEON_REDIS_PASSWORD=kept\n")
    upgraded = compose_env()
    assert set(upgraded) == required and upgraded["AEGAEON_REDIS_PASSWORD"] == "kept"


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
    mount = next(v for v in collector["volumes"] if "otel-collector-config.yaml" in v)
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
        pod = pod_spec(doc)
        found += pod.get("containers", [])
    return found


def test_kubernetes_manifests_run_real_entry_points() -> None:
    ours = [c for c in _containers() if c["image"] in AEGAEON_IMAGES]
    kinds = {check_aegaeon_command(command_words(c))[1] for c in ours}
    assert kinds == SERVE_KINDS


def test_kubernetes_workers_share_shared_memory_with_their_model_store() -> None:
    for doc in K8S_DOCS:
        pod = pod_spec(doc)
        names = {command_words(c)[2] for c in pod.get("containers", [])
                 if c["image"] in AEGAEON_IMAGES}  # fmt: skip
        if "worker" in names:
            assert "model-store" in names
            shm = next(v for v in pod["volumes"] if v["name"] == "shm")
            assert shm["emptyDir"]["medium"] == "Memory"
            for container in pod["containers"]:
                assert {"name": "shm", "mountPath": "/dev/shm"} in container["volumeMounts"]


def _secret_keys(container: dict[str, Any]) -> dict[str, str]:
    """Variable → key of the aegaeon-bus secret, for each variable the container reads from it."""
    found = {}
    for variable in container.get("env", []):
        ref = variable.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["name"] == "aegaeon-bus", (container["name"], variable["name"])
            found[variable["name"]] = ref["key"]
    return found


def test_kubernetes_commits_no_secret_and_every_bus_user_reads_only_its_keys() -> None:
    assert not [d for d in K8S_DOCS if d["kind"] == "Secret"]
    for container in _containers():  # no container gets the whole secret
        assert not [r for r in container.get("envFrom", []) if "secretRef" in r], container["name"]
    for container in _containers():
        keys = _secret_keys(container)
        if container["image"] in AEGAEON_IMAGES:
            role = _role(command_words(container))
            assert role is not None
            user = {v["name"]: v.get("value") for v in container["env"]}["AEGAEON_NATS_USER"]
            assert user == role, container["name"]
            assert keys == {"AEGAEON_NATS_PASSWORD": password_variable(role),
                            "AEGAEON_REDIS_PASSWORD": "AEGAEON_REDIS_PASSWORD"}  # fmt: skip
        elif container["name"] == "nats":  # nats.conf reads each role's password by its name,
            # nats-cluster.conf the route password
            assert keys == {variable: variable for variable in NATS_PASSWORDS | {ROUTE_PASSWORD}}
        elif container["name"] == "redis":
            assert set(keys.values()) == {"AEGAEON_REDIS_PASSWORD"}
        else:
            assert keys == {}, container["name"]


def test_the_bus_secret_documentation_lists_every_key_the_manifests_read() -> None:
    documented = set(re.findall(r"--from-literal=([A-Z_]+)=", (ROOT / "infra/k8s/config.yaml").read_text()))  # fmt: skip
    read = {key for container in _containers() for key in _secret_keys(container).values()}
    assert documented == read == NATS_PASSWORDS | {"AEGAEON_REDIS_PASSWORD", ROUTE_PASSWORD}


def test_kubernetes_admits_clients_at_the_gateway_only():
    policies = {d["metadata"]["name"]: d["spec"] for d in K8S_DOCS if d["kind"] == "NetworkPolicy"}
    deny = policies.pop("default-deny-ingress")
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress"]}
    open_to_all = [p["podSelector"] for p in policies.values()
                   if any("from" not in rule for rule in p["ingress"])]  # fmt: skip
    assert open_to_all == [{"matchLabels": {"app": "gateway"}}]
    assert "network-policy.yaml" in KUSTOMIZATION["resources"]
    generated = {g["name"]: g["files"] for g in KUSTOMIZATION["configMapGenerator"]}
    assert generated == {"nats-config": ["nats-cluster.conf", "nats.conf"],
                         "redis-start": ["redis-start.sh"],
                         "otel-collector": ["config.yaml=otel-collector-config.yaml"]}  # fmt: skip
