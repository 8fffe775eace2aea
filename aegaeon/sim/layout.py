"""Simulated deployments: which GPUs prefill and which decode, and what each policy's instances
hold in memory.

**Layouts.** At a GPU count every policy is offered the same candidates (:func:`candidates`):
every GPU doing both, and disaggregated layouts with a share of each node's GPUs as prefill
instances — the paper's 3 prefill : 5 decode per 8-GPU node among them. A policy without
prefill/decode roles (every policy but ``aegaeon`` today: the baselines route and batch on
their own and ignore an instance's role) runs each candidate as the all-``both`` layout, so for
it the candidates collapse to that one; the layout a result came from is reported beside it.

**Residency** at paper scale (:func:`residency`), per policy, what its original system holds:

- ``aegaeon``: the engine's 2 weight slots (resident + prefetched), each sized for the largest
  model (``services/gpu-worker/engine.py``, ``EngineConfig.weight_slots``);
- ``request-level`` / ``sllm-plus`` (ServerlessLLM) and ``dedicated``: one model per instance,
  the one slot a ServerlessLLM (vLLM) instance loads; no prefetch;
- ``static-mux`` (MuxServe): co-located models by memory — as many as fit beside a KV reserve;
- any other registered policy: the engine's slots.

When the simulator mirrors the live system (``simulate_policy``, ``bench serve``) every policy
gets the engine's 2 slots, as every live worker has.
"""

from __future__ import annotations

from dataclasses import dataclass

from aegaeon.scheduler.policies.base import InstanceRole, InstanceView, ModelSpec
from aegaeon.sim.device import ENGINE_WEIGHT_SLOTS
from aegaeon.sim.hardware import DeviceSpec
from aegaeon.sim.nodes import node_of

GPUS_PER_NODE = 8
PREFILL_PER_NODE = (1, 2, 3)  # of 8 GPUs; 3 : 5 is the paper's layout
KV_RESERVE_FRACTION = 0.2  # of device memory kept for KV by a policy that co-locates by memory
USABLE_MEMORY = 0.9
ROLE_POLICIES = frozenset({"aegaeon"})  # policies that give prefill and decode instances roles
SLOTS: dict[str, int | None] = {
    "aegaeon": ENGINE_WEIGHT_SLOTS,
    "request-level": 1,
    "sllm-plus": 1,
    "dedicated": 1,
    "static-mux": None,  # by bytes
}


@dataclass(frozen=True)
class Deployment:
    """How many GPUs, and how many of them are prefill instances (0: every GPU does both)."""

    gpus: int
    prefill: int = 0

    @property
    def name(self) -> str:
        if not self.prefill:
            return f"{self.gpus} both"
        return f"{self.prefill} prefill + {self.gpus - self.prefill} decode"

    def to_json(self) -> dict:
        return {"gpus": self.gpus, "prefill": self.prefill, "decode": self.gpus - self.prefill
                if self.prefill else 0, "both": 0 if self.prefill else self.gpus,
                "name": self.name}  # fmt: skip


def prefill_count(gpus: int, per_node: int, node: int = GPUS_PER_NODE) -> int:
    """Prefill instances when ``per_node`` of every ``node`` GPUs prefill (a partial node keeps
    the share, rounded, and at least one of each role)."""
    full, rest = divmod(gpus, node)
    count = full * per_node + round(rest * per_node / node)
    return max(1, min(gpus - 1, count))


def candidates(gpus: int) -> list[Deployment]:
    """The layouts offered to every policy at ``gpus`` GPUs."""
    out = [Deployment(gpus)]
    if gpus >= 2:
        shares = sorted({prefill_count(gpus, k) for k in PREFILL_PER_NODE})
        out.extend(Deployment(gpus, p) for p in shares)
    return out


def has_roles(policy_name: str) -> bool:
    return policy_name in ROLE_POLICIES


def layouts_for(policy_name: str, gpus: int) -> list[Deployment]:
    """The candidates as ``policy_name`` runs them (role-less: the all-both layout, once)."""
    offered = candidates(gpus)
    if has_roles(policy_name):
        return offered
    return [Deployment(gpus)]


def residency(policy_name: str) -> int | None:
    """Weight slots of the policy's original system (None: by bytes)."""
    return SLOTS.get(policy_name, ENGINE_WEIGHT_SLOTS)


def weight_budget(policy_name: str, device: DeviceSpec, models: dict[str, ModelSpec]) -> int:
    """Device memory a policy's instance gives to weights (the rest holds KV)."""
    usable = device.memory_bytes * USABLE_MEMORY
    biggest = max(m.weight_bytes for m in models.values())
    slots = residency(policy_name)
    if slots is None:
        return int(usable * (1 - KV_RESERVE_FRACTION))
    return min(int(usable * (1 - KV_RESERVE_FRACTION)), slots * biggest)


def instance_views(
    deployment: Deployment, device: DeviceSpec, models: dict[str, ModelSpec],
    policy_name: str = "static-mux", per_node: int | None = None,
) -> list[InstanceView]:  # fmt: skip
    """The instances of a deployment; every GPU gets the same memory split. Prefill instances
    are spread over the nodes (the first ones of each node). ``per_node``: GPUs a node, and
    each view names its node (GPU i on node i // per_node; the last may be partial)."""
    usable = device.memory_bytes * USABLE_MEMORY
    weights = weight_budget(policy_name, device, models)
    biggest_kv = max(m.kv_bytes_per_token for m in models.values())
    prefill = set(_spread(deployment.gpus, deployment.prefill, per_node or GPUS_PER_NODE))
    views = []
    for i in range(deployment.gpus):
        role: InstanceRole = "both"
        if deployment.prefill:
            role = "prefill" if i in prefill else "decode"
        views.append(InstanceView(f"g{i:03d}", role=role,
                                  kv_capacity_tokens=int((usable - weights) // biggest_kv),
                                  weight_budget_bytes=weights,
                                  node=node_of(i, per_node) if per_node else None))  # fmt: skip
    return views


def _spread(gpus: int, prefill: int, node: int = GPUS_PER_NODE) -> list[int]:
    """Indices of the prefill GPUs, dealt round-robin over the nodes."""
    nodes = [list(range(start, min(start + node, gpus))) for start in range(0, gpus, node)]
    out: list[int] = []
    depth = 0
    while len(out) < prefill:
        for members in nodes:
            if depth < len(members) and len(out) < prefill:
                out.append(members[depth])
        depth += 1
    return out
