"""docker-compose.yml against what `docker compose config` and `up` check, without a Docker
engine: only keys of the compose specification, every variable interpolated with a default or
required, dependencies that can meet their conditions, volumes that exist. The services'
commands, secrets and shared memory: test_compose.py."""

from __future__ import annotations

import re
from typing import Any

from k8s_render import ROOT
from test_compose import COMPOSE, SERVICES

COMPOSE_TOP_LEVEL = {"name", "services", "networks", "volumes", "secrets", "configs", "include"}
# The compose specification's service properties (compose-spec.json, services.*).
_SPEC_SERVICE_PROPERTIES = """
    annotations attach build blkio_config cap_add cap_drop cgroup cgroup_parent command configs
    container_name cpu_count cpu_percent cpu_period cpu_quota cpu_rt_period cpu_rt_runtime
    cpu_shares cpus cpuset credential_spec depends_on deploy develop device_cgroup_rules devices
    dns dns_opt dns_search domainname entrypoint env_file environment expose extends
    external_links extra_hosts gpus group_add healthcheck hostname image init ipc isolation labels
    links logging mac_address mem_limit mem_reservation mem_swappiness memswap_limit network_mode
    networks oom_kill_disable oom_score_adj pid pids_limit platform ports post_start pre_stop
    privileged profiles pull_policy read_only restart runtime scale secrets security_opt shm_size
    stdin_open stop_grace_period stop_signal storage_opt sysctls tmpfs tty ulimits user
    userns_mode uts volumes volumes_from working_dir
"""
COMPOSE_SERVICE_KEYS = set(_SPEC_SERVICE_PROPERTIES.split())
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
INTERPOLATION = re.compile(
    r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])[^}]*)?\}|\$([A-Za-z_][A-Za-z0-9_]*)"
)


def _strings(value: Any) -> list[str]:
    """Every string of a parsed YAML value, keys included."""
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in _strings(k) + _strings(v)]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return [value] if isinstance(value, str) else []


def test_compose_uses_only_keys_of_the_compose_specification() -> None:
    assert {k for k in COMPOSE if not k.startswith("x-")} <= COMPOSE_TOP_LEVEL
    for name, spec in SERVICES.items():
        assert set(spec) <= COMPOSE_SERVICE_KEYS, (name, set(spec) - COMPOSE_SERVICE_KEYS)
        for variable, value in (spec.get("environment") or {}).items():
            assert isinstance(value, str | int | float | bool) or value is None, (name, variable)


def test_every_compose_variable_is_interpolated_and_has_a_default_or_is_required() -> None:
    """Compose substitutes ``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}``… and an unset
    variable without a default silently as "": here each has a default or is required (and
    ``make compose-env`` writes every required one: test_compose.py). ``$$`` is a literal
    dollar."""
    for text in _strings(COMPOSE):
        for match in INTERPOLATION.finditer(text):
            if match.group(0) == "$$":
                continue
            assert match.group(2) in ("-", ":-", "?", ":?"), (text, "neither default nor required")
        assert "$" not in INTERPOLATION.sub("", text), text  # no malformed ${…


def _depends_on(spec: dict[str, Any]) -> dict[str, str]:
    """Service → condition (a list means service_started)."""
    deps = spec.get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: dep.get("condition", "service_started") for name, dep in deps.items()}


def test_every_dependency_is_a_service_that_can_meet_its_condition() -> None:
    """As `docker compose config` refuses: a dependency that is not a service, or one a profile
    leaves out while the dependent runs; and as `up` would hang: waiting for the health of a
    service without a healthcheck, or for a long-running service to complete."""
    for name, spec in SERVICES.items():
        for dependency, condition in _depends_on(spec).items():
            assert dependency in SERVICES, (name, dependency)
            target = SERVICES[dependency]
            profiles = set(target.get("profiles", []))
            assert profiles <= set(spec.get("profiles", [])), (name, dependency)
            assert condition in CONDITIONS, (name, dependency)
            if condition == "service_healthy":
                assert "healthcheck" in target, (name, dependency)
            if condition == "service_completed_successfully":
                assert target.get("restart") == "no", (name, dependency)
        for key in ("ipc", "network_mode", "pid"):
            if str(spec.get(key, "")).startswith("service:"):
                other = spec[key].split(":", 1)[1]
                assert other in _depends_on(spec), (name, key, "needs a depends_on on it")
                if key == "ipc":
                    assert SERVICES[other].get("ipc") == "shareable", (name, other)


def test_every_volume_is_a_declared_named_volume_or_an_existing_repository_path() -> None:
    declared = set(COMPOSE.get("volumes") or {})
    used = set()
    for name, spec in SERVICES.items():
        for volume in spec.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), (name, source)
            else:
                assert source in declared, (name, source)
                used.add(source)
    assert used == declared
