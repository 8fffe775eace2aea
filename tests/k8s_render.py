"""infra/k8s rendered as ``kubectl kustomize`` builds it, and small readings of the rendered
objects: what the manifest tests (test_k8s_manifests.py) and the tests that run its configs on
real servers (test_k8s_servers.py) share."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "infra" / "k8s"
KUSTOMIZATION = yaml.safe_load((K8S / "kustomization.yaml").read_text())
CLUSTER_SCOPED = {"Namespace"}
NATS_CONF = K8S / "nats.conf"  # the servers' config (compose mounts it too)
ROUTE_PASSWORD = "AEGAEON_NATS_ROUTE_PASSWORD"  # the NATS servers' routes (nats-cluster.conf)


def _generated_config_maps(kustomization: dict[str, Any], folder: Path) -> list[dict[str, Any]]:
    """configMapGenerator's ConfigMaps: one key per file (``key=path`` or the file's name)."""
    maps = []
    for generator in kustomization.get("configMapGenerator", []):
        data = {}
        for entry in generator["files"]:
            key, _, path = entry.rpartition("=")
            data[key or Path(path).name] = (folder / path).read_text()
        maps.append({"apiVersion": "v1", "kind": "ConfigMap",
                     "metadata": {"name": generator["name"]}, "data": data})  # fmt: skip
    return maps


def _set_images(doc: dict[str, Any], images: list[dict[str, str]]) -> None:
    """kustomize's ``images:``: a container image named ``name`` becomes ``newName:newTag``."""
    for container in pod_spec(doc).get("containers", []):
        for image in images:
            if container["image"].split(":")[0] == image["name"]:
                name = image.get("newName", image["name"])
                container["image"] = f"{name}:{image['newTag']}" if "newTag" in image else name


def render(folder: Path = K8S) -> list[dict[str, Any]]:
    """What ``kubectl kustomize <folder>`` builds, for the features kustomization.yaml uses
    (resources, configMapGenerator, namespace, images), less the hash kustomize appends to a
    generated ConfigMap's name."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    docs = [doc for resource in kustomization["resources"]
            for doc in yaml.safe_load_all((folder / resource).read_text()) if doc]  # fmt: skip
    docs += _generated_config_maps(kustomization, folder)
    for doc in docs:
        if doc["kind"] not in CLUSTER_SCOPED and "namespace" in kustomization:
            doc["metadata"]["namespace"] = kustomization["namespace"]
        _set_images(doc, kustomization.get("images", []))
    return docs


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    """The pod template's spec of a workload ({} for anything else)."""
    return doc.get("spec", {}).get("template", {}).get("spec", {})


DOCS = render()
WORKLOADS = {d["metadata"]["name"]: d for d in DOCS if pod_spec(d)}
SERVICES = {d["metadata"]["name"]: d for d in DOCS if d["kind"] == "Service"}
CONFIG_MAPS = {d["metadata"]["name"]: d for d in DOCS if d["kind"] == "ConfigMap"}


def containers() -> Iterator[tuple[str, dict[str, Any]]]:
    """(workload name, container) for every container of every workload."""
    for name, doc in WORKLOADS.items():
        for container in pod_spec(doc)["containers"]:
            yield name, container


def option(container: dict[str, Any], flag: str) -> str | None:
    """The value of ``--flag`` in the container's command (None when absent)."""
    words = [str(w) for w in container.get("command", []) + container.get("args", [])]
    return words[words.index(flag) + 1] if flag in words else None


def env_value(container: dict[str, Any], name: str) -> Any:
    """The container's variable ``name``: its value, or its valueFrom."""
    for variable in container.get("env", []):
        if variable["name"] == name:
            return variable.get("value", variable.get("valueFrom"))
    raise KeyError(name)
