"""A roofline cost model of accelerators, and the paper's model mix (DESIGN.md §7).

A decode step reads every weight once and each request's KV once: memory bound, so its time is
bytes over HBM bandwidth, plus the (small) matmul FLOPs per request. A prefill step is compute
bound: 2·params FLOPs per token, plus attention, quadratic in each prompt's length. A switch copies
the weights over the host→device link. Efficiencies are the fractions of peak that serving engines
reach in practice (≈80% of HBM bandwidth and of the link, ≈50% of bf16 FLOPs).

:class:`NodeSpec`: the server around the accelerators (GPUs per node, host memory that caches
weights, the network link that brings weights to a node), for fleets of many nodes
(:mod:`aegaeon.sim.nodes`).
"""

from __future__ import annotations

from dataclasses import dataclass

from aegaeon.scheduler.estimators import ModelProfile
from aegaeon.scheduler.policies.base import ModelSpec

GiB = 1 << 30
HBM_EFFICIENCY = 0.8
FLOPS_EFFICIENCY = 0.5
LINK_EFFICIENCY = 0.8
STEP_OVERHEAD_S = 0.004  # kernel launches, sampling, scheduling per step
SWITCH_FIXED_S = 0.05  # rebinding weights, re-carving KV (engine is reused, DESIGN.md §5)


@dataclass(frozen=True)
class DeviceSpec:
    """Peak numbers of one accelerator."""

    name: str
    hbm_bytes_per_s: float
    flops: float  # dense bf16 (fp32 for the CPU)
    link_bytes_per_s: float  # host → device
    memory_bytes: int
    bytes_per_param: int = 2


DEVICES: dict[str, DeviceSpec] = {
    "H800": DeviceSpec("H800", 3.35e12, 989e12, 64e9, 80 * GiB),
    "H100": DeviceSpec("H100", 3.35e12, 989e12, 64e9, 80 * GiB),
    "H20": DeviceSpec("H20", 4.0e12, 148e12, 64e9, 96 * GiB),
    "A100": DeviceSpec("A100", 2.0e12, 312e12, 32e9, 80 * GiB),
    # A 2-core development box running fp32 demo models: memcpy-speed "link".
    "cpu": DeviceSpec("cpu", 10e9, 50e9, 5e9, 16 * GiB, bytes_per_param=4),
}


@dataclass(frozen=True)
class NodeSpec:
    """One server of accelerators: how many, its host memory (a share of which caches model
    weights) and the network link that brings weights from the model store or a peer node."""

    gpus: int
    host_memory_bytes: int
    network_bytes_per_s: float  # the storage / front-end NIC, peak

    @property
    def host_cache_bytes(self) -> int:
        return int(self.host_memory_bytes * HOST_CACHE_SHARE)

    @property
    def fetch_bytes_per_s(self) -> float:
        return self.network_bytes_per_s * NETWORK_EFFICIENCY


TiB = 1 << 40
HOST_CACHE_SHARE = 0.5
"""Of a node's host DRAM, the share that caches weights; the rest holds the host KV pool, pinned
staging buffers and the OS."""
NETWORK_EFFICIENCY = 0.8  # of a NIC's line rate that a bulk transfer reaches
# An HGX H800/H100 server as sold (e.g. the paper's H800 nodes): 8 GPUs, 2 TB DDR5, and a
# 200 Gb/s storage NIC beside the GPUs' compute fabric: 1 TiB of weight cache per node, weights
# fetched at 20 GB/s. H20 and A100 servers alike (the A100 generation with 1 TB, 100 Gb/s).
NODES: dict[str, NodeSpec] = {
    "H800": NodeSpec(8, 2 * TiB, 25e9),
    "H100": NodeSpec(8, 2 * TiB, 25e9),
    "H20": NodeSpec(8, 2 * TiB, 25e9),
    "A100": NodeSpec(8, 1 * TiB, 12.5e9),
    "cpu": NodeSpec(1, 64 * GiB, 1.25e9),  # a development box on a 10 Gb/s LAN
}


def node_spec(device: str | DeviceSpec) -> NodeSpec:
    """The server that holds ``device`` (see :data:`NODES`)."""
    name = device.name if isinstance(device, DeviceSpec) else device_spec(device).name
    return NODES.get(name, NODES["H800"])


def device_spec(name: str) -> DeviceSpec:
    """The spec named ``name`` (case-insensitive); ``cuda…`` means an H100, anything else the CPU."""
    for key, spec in DEVICES.items():
        if key.lower() == name.lower():
            return spec
    return DEVICES["H100"] if name.lower().startswith("cuda") else DEVICES["cpu"]


def roofline_profile(model: ModelSpec, device: str | DeviceSpec) -> ModelProfile:
    """Linear step-time coefficients of ``model`` on ``device`` from its peak numbers."""
    dev = device if isinstance(device, DeviceSpec) else device_spec(device)
    hbm = dev.hbm_bytes_per_s * HBM_EFFICIENCY
    flops = dev.flops * FLOPS_EFFICIENCY
    params = model.weight_bytes / dev.bytes_per_param
    # Attention FLOPs per (query, key) pair ≈ 4·layers·kv width; kv bytes/token = 2·layers·width·dtype.
    attn_per_pair = 2.0 * model.kv_bytes_per_token / dev.bytes_per_param
    return ModelProfile(
        prefill=(STEP_OVERHEAD_S + model.weight_bytes / hbm, 2.0 * params / flops,
                 attn_per_pair / flops),
        decode=(STEP_OVERHEAD_S + model.weight_bytes / hbm, model.kv_bytes_per_token / hbm,
                2.0 * params / flops),
        switch_fixed_s=SWITCH_FIXED_S,
        link_bytes_per_s=dev.link_bytes_per_s * LINK_EFFICIENCY,
        weight_bytes=model.weight_bytes,
        kv_bytes_per_token=model.kv_bytes_per_token,
    )  # fmt: skip


# The paper's mix (§7): 60% 7B, 20% 9B, 20% 13B, bf16. Shapes of Llama-2-7B, Yi-9B (GQA),
# Llama-2-13B: kv bytes/token = 2 (K,V) · layers · kv_heads · head_dim · 2 bytes.
PAPER_SIZES: dict[str, tuple[float, int]] = {
    "7b": (6.74e9, 2 * 32 * 32 * 128 * 2),
    "9b": (8.83e9, 2 * 48 * 4 * 128 * 2),
    "13b": (13.0e9, 2 * 40 * 40 * 128 * 2),
}


def paper_models(count: int) -> dict[str, ModelSpec]:
    """``count`` models in the paper's 60/20/20 mix of 7B/9B/13B, interleaved so that any
    prefix keeps the mix."""
    pattern = ["7b", "9b", "7b", "13b", "7b"]  # 3/5 7B, 1/5 9B, 1/5 13B
    models = {}
    for i in range(count):
        size = pattern[i % len(pattern)]
        params, kv = PAPER_SIZES[size]
        name = f"m{i:03d}-{size}"
        models[name] = ModelSpec(name, int(params * 2), kv, context_length=4096)
    return models
