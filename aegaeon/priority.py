"""Per-model priority classes: what an operator sets, and what a policy makes of it. Pure.

A model's class weighs its work against other models' on a shared instance: a higher class's
groups are prefilled first and its decode turns get longer quotas (more tokens per round). No
class starves another: once a request has waited ``max_wait_s`` for its first token, its work
goes before every class's. With every model of one class (the default, ``normal``), every
policy orders exactly as without classes, the maximum wait included.
"""

from __future__ import annotations

from typing import Literal, get_args

Priority = Literal["low", "normal", "high"]
PRIORITIES: tuple[str, ...] = get_args(Priority)
DEFAULT_PRIORITY: Priority = "normal"

QUOTA_WEIGHT: dict[str, float] = {"low": 0.5, "normal": 1.0, "high": 2.0}
"""A decode turn's quota is multiplied by its model's weight: under a shared rotation a high
model gets twice a normal one's tokens per round, a low one half."""

DEFAULT_MAX_WAIT_S = 30.0
"""How long a request waits for its first token before its class stops counting. Against the
default 10 s TTFT target: a low model under a saturating high load still starts within this."""


def rank(priority: str) -> int:
    """0 for the highest class: a sort key (unknown names rank as the default)."""
    order = PRIORITIES[::-1]
    return order.index(priority) if priority in order else order.index(DEFAULT_PRIORITY)


def quota_weight(priority: str) -> float:
    return QUOTA_WEIGHT.get(priority, 1.0)


def check_priority(value: str) -> Priority:
    """``value`` as a class, or ValueError naming the classes."""
    if value not in PRIORITIES:
        raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}; got {value!r}")
    return value  # type: ignore[return-value]
