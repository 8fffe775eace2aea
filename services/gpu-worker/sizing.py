"""How a worker cuts its device memory, from the models it will serve. Pure: no I/O, no torch.

    arena = weight slots × (largest model + room to convert its dtype) + KV (the rest)

The arena defaults to a share of the device: on CUDA most of the free memory, on the CPU a
share of RAM (pages are only touched as weights and KV fill them), and the slots to the largest
registered model. Explicit sizes (flags) win; a model that no slot of this worker can hold is
named with the sizes that would hold it, and the flag that changes them.
"""

from __future__ import annotations

from dataclasses import dataclass

from aegaeon.protocol import ModelInfo

ALIGN = 4096
KV_MIN_BYTES = 256 << 20
"""The least KV room a worker starts with (a few thousand tokens of a small model)."""
CUDA_FREE_SHARE = 0.9
CPU_RAM_SHARE = 0.25
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
ENGINE_DTYPES = ("float32", "bfloat16", "float16")
"""What a worker computes in (``--dtype``); "auto" picks one from the registered models."""


def _align(value: int) -> int:
    return -(-value // ALIGN) * ALIGN


def slot_need(model: ModelInfo, engine_dtype: str) -> int:
    """Bytes of a weight slot the model takes: its weights as stored, plus converted copies when
    the engine computes in another dtype (an upper bound of the engine's own ``slot_need``)."""
    need = _align(model.weight_bytes)
    if model.dtype != engine_dtype:
        need += _align(model.num_parameters * DTYPE_BYTES.get(engine_dtype, 4))
    return need


def engine_dtype(models: list[ModelInfo], requested: str, cuda: bool) -> str:
    """The dtype a worker computes in. ``requested`` wins unless it is "auto"; then the models'
    own dtype when they all share one of the engine's dtypes (a bf16 or fp16 checkpoint is
    served as it is stored, on the CPU too: nothing is converted at a switch), except float32 on
    CUDA, and otherwise the device's default: float32 on the CPU (every checkpoint dtype
    converts to it exactly), bfloat16 on CUDA."""
    if requested != "auto":
        return requested
    default = "bfloat16" if cuda else "float32"
    stored = {m.dtype for m in models}
    if len(stored) == 1 and (only := stored.pop()) in ENGINE_DTYPES and not (cuda and only == "float32"):  # fmt: skip
        return only
    return default


@dataclass(frozen=True)
class MemoryPlan:
    """The sizes to build the engine with, and the models this worker cannot hold (with why)."""

    arena_bytes: int
    weight_budget_bytes: int
    refused: dict[str, str]


def plan_memory(
    models: list[ModelInfo],
    *,
    engine_dtype: str,
    slots: int,
    device_bytes: int,
    arena_bytes: int | None = None,
    weight_budget_bytes: int | None = None,
) -> MemoryPlan:
    """Size the worker. ``device_bytes``: what the device may give (the share of free memory or
    RAM). By default the slots are sized for the largest model that fits and KV takes the rest;
    an explicit ``arena_bytes`` keeps half of it for weights unless ``weight_budget_bytes`` says
    otherwise (a budget chosen on purpose, e.g. by ``bench serve``)."""
    arena = arena_bytes or device_bytes
    needs = {m.name: slot_need(m, engine_dtype) for m in models}
    if weight_budget_bytes or arena_bytes:
        weights = weight_budget_bytes or arena // 2
        room = weights // slots
    else:
        room = max(0, arena - KV_MIN_BYTES) // slots
        fitting = [need for need in needs.values() if need <= room]
        weights = slots * max(fitting) if fitting else arena // 2
    refused = {
        name: _refusal(name, need, slots, arena_bytes, weight_budget_bytes, device_bytes)
        for name, need in needs.items()
        if need > room
    }
    return MemoryPlan(arena, weights, refused)


def _refusal(
    name: str, need: int, slots: int, arena: int | None, budget: int | None, device: int
) -> str:
    gib = 1 << 30
    wanted = slots * need + KV_MIN_BYTES
    if budget:
        fix = f"raise --weight-budget-bytes to at least {slots * need}"
        held = f"a weight budget of {budget / gib:.2f} GiB"
    elif arena:
        fix = f"raise --arena-bytes to at least {wanted}"
        held = f"an arena of {arena / gib:.2f} GiB"
    else:
        fix = "serve it on a device with more memory"
        held = f"{device / gib:.2f} GiB of device memory"
    return (
        f"model {name!r} needs {need / gib:.2f} GiB per weight slot ({slots} slots, plus KV: "
        f"{wanted / gib:.2f} GiB); this worker has {held}: {fix}"
    )
