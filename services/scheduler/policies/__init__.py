"""Scheduling policies, chosen by name (``--policy``).

``POLICIES`` maps each name to ``"module:Class"``; ``make_policy`` imports only the one asked
for, so a policy module that is missing or broken cannot stop the others from loading.
"""

from __future__ import annotations

import importlib
from typing import Any

from aegaeon.scheduler.policies.base import ModelSpec, Policy, Slo, StepTimeEstimator

POLICIES: dict[str, str] = {
    "aegaeon": "aegaeon.scheduler.policies.aegaeon:AegaeonPolicy",
    "request-level": "aegaeon.scheduler.policies.request_level:RequestLevelPolicy",
    "sllm-plus": "aegaeon.scheduler.policies.sllm_plus:SllmPlusPolicy",
    "static-mux": "aegaeon.scheduler.policies.static_mux:StaticMuxPolicy",
    "dedicated": "aegaeon.scheduler.policies.dedicated:DedicatedPolicy",
    "round-robin": "aegaeon.scheduler.policies.round_robin:RoundRobinPolicy",
}
"""Policy name (the ``--policy`` value) → ``module:Class`` that implements it."""


class UnknownPolicy(ValueError):
    """``make_policy`` was asked for a name that is not in ``POLICIES``."""


def policy_class(name: str) -> type[Policy]:
    """The class registered under ``name`` (imported now)."""
    target = POLICIES.get(name)
    if target is None:
        known = ", ".join(sorted(POLICIES))
        raise UnknownPolicy(f"unknown policy {name!r}; known policies: {known}")
    module_name, class_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls  # type: ignore[no-any-return]


def make_policy(
    name: str,
    models: dict[str, ModelSpec],
    slo: Slo,
    estimator: StepTimeEstimator | None = None,
    **options: Any,
) -> Policy:
    """Build the policy registered under ``name``; ``options`` go to its constructor."""
    return policy_class(name)(models, slo, estimator, **options)
