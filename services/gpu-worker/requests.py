"""The engine's per-request state and its public output types."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aegaeon.protocol import KVHandle as KVHandle  # defined once, on the wire
from aegaeon.protocol import SamplingParams


@dataclass
class TokenOutput:
    """One generated token of one request, from one engine step."""

    request_id: str
    index: int  # position in the output (0 = first generated token)
    token_id: int
    logprob: float | None
    top_logprobs: list[tuple[int, float]]  # empty unless sampling.logprobs
    finish_reason: str | None  # "stop" (eos or stop_token_ids) | "length" | "error" | None
    error: str | None = None  # with "error": why this request (alone) failed; no token then


@dataclass
class SwitchStats:
    """What a ``switch_to`` did. ``seconds``: how long the caller waited for the weights;
    ``bytes``: copied while it waited; ``prefetched_bytes``: copied in the background before
    (a switch to a fully prefetched model has ``bytes == 0``)."""

    from_model: str | None
    to_model: str
    seconds: float
    bytes: int
    prefetched_bytes: int = 0


@dataclass
class EngineStats:
    """A snapshot of the engine's capacity (cheap: read by the heartbeat from another thread)."""

    device: str
    resident_model: str | None
    arena_bytes: int
    weight_budget_bytes: int
    slot_bytes: int  # one weight slot: the largest model this engine can hold
    block_size: int
    kv_blocks_total: int
    kv_blocks_free: int
    host_kv_bytes_total: int
    host_kv_bytes_free: int
    num_requests: int


@dataclass
class HostCopy:
    """Where a request's KV lies in the host pool while it is swapped out."""

    offset: int
    nbytes: int
    num_blocks: int = 0
    shapes: list[tuple[int, ...]] = field(default_factory=list)  # fallback caches only


@dataclass
class Request:
    """A request the engine holds. Its KV is in one of: nowhere, device blocks, the host pool."""

    request_id: str
    model: str
    prompt: list[int]
    sampling: SamplingParams
    outputs: list[int]
    seed: int
    order: int  # admission order: the most recent is preempted first
    blocks: list[int] = field(default_factory=list)
    host: HostCopy | None = None
    fallback_kv: Any = None  # the fallback runner's per-request cache while on the device
    last_used: int = 0

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.outputs

    @property
    def on_device(self) -> bool:
        return bool(self.blocks) or self.fallback_kv is not None

    @property
    def needs_prefill(self) -> bool:
        return not self.on_device and self.host is None
