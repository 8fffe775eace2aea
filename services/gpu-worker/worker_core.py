"""What every part of the gpu-worker shell shares: its state and the engine's thread.

``WorkerService`` (worker.py: commands, turns, heartbeats) is assembled from this core and two
mixins over it: ``Residency`` (residency.py: which model the engine holds, host-cache loads,
prefetch) and ``TurnSpans`` (turn_spans.py: what a turn's steps report in metrics and traces).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from aegaeon.gpu_worker.delivery import HeldRequest, TokenDelivery
from aegaeon.gpu_worker.energy import EnergyMeter
from opentelemetry import trace

from aegaeon.bus import Bus
from aegaeon.config import node_name
from aegaeon.fencing_token import EpochFence
from aegaeon.protocol import RunTurn, WorkerRole
from aegaeon.state import Keys
from aegaeon.telemetry import RequestTrace

HEARTBEAT_INTERVAL_S = 1.0
ENSURE_TIMEOUT_S = 120.0
ENSURE_LEASE_S = 60.0
"""How long the store keeps a model's file for this worker after ensuring it: until the copy
that follows has mapped it (a mapped file survives an eviction)."""


@dataclass
class TurnState:
    """The turn in progress."""

    command: RunTurn
    preempted: bool = False
    started: float = field(default_factory=time.monotonic)
    span: trace.Span = trace.INVALID_SPAN  # ``aegaeon.turn``
    first_step_ns: int = 0  # wall clock of the first step (after the switch), for spans
    last_step_ns: int = 0
    tokens: dict[str, int] = field(default_factory=dict)  # request id → tokens this turn
    traces: dict[str, RequestTrace] = field(default_factory=dict)  # outlive a finished request
    prefilled: list[str] = field(default_factory=list)  # requests whose prefill ran this turn


@dataclass
class EngineStep:
    """An engine step under way on the engine's thread: ``outputs`` resolves to its outputs."""

    outputs: asyncio.Future
    batch: list[str]
    t0: float  # monotonic, when it was started
    t0_ns: int  # wall clock, for spans
    host_free: int  # the host KV pool's free bytes before it (swap-in metrics)


class WorkerCore:
    """The worker's state; the engine is touched from its one thread only (``_on_engine``)."""

    def __init__(
        self,
        worker_id: str,
        role: WorkerRole,
        engine: Any,
        bus: Bus,
        redis: aioredis.Redis,
        store_id: str | None = None,
        kv_transfer_address: str = "",
    ) -> None:
        self.worker_id = worker_id
        # Where this worker serves exported KV to other nodes ("": it hands KV on its node only).
        self.kv_transfer_address = kv_transfer_address
        self.store_id = store_id  # this node's model-store; None: any store answers
        self.incarnation = uuid.uuid4().hex
        self.node = node_name()
        self.role = role
        self.engine = engine
        self.bus = bus
        self.redis = redis
        self.keys = Keys(bus.config.prefix)
        self.subjects = bus.subjects
        self.held: dict[str, HeldRequest] = {}
        self.delivery = TokenDelivery(worker_id, bus, redis, self.held)
        self.registered: dict[str, str] = {}  # model → host-cache path registered with the engine
        self.turn: TurnState | None = None
        # A RunTurn received but still queued (behind an assign that loads a model): heartbeats
        # name it, so the scheduler does not take the worker for idle and the turn for lost.
        self._queued_turn: int | None = None
        self.draining = False
        self._commands: asyncio.Queue[Any] = asyncio.Queue()
        self._engine_thread = ThreadPoolExecutor(1, thread_name_prefix="engine")
        self._stopped = asyncio.Event()
        self._prefetch_wanted: str | None = None  # the model the scheduler named last
        self._restaged_for: int | None = None  # a PrefetchModel came after this turn's RunTurn
        # Switches the engine made (counted on its thread) and the turn of the last one: a
        # staging asked before a later switch is stale (``Residency._prefetch_on_engine``).
        self._switches = 0
        self._last_switch_turn: int | None = None
        # The model staged in the free slot and whether no turn ran when its copy began (an
        # idle instance's guess at the next arrival, not a copy behind another model's decode).
        self._staged_while_idle: tuple[str, bool] | None = None
        self._pinned: str | None = None  # the model the engine keeps in a slot (RunTurn.pinned)
        self._fence = EpochFence()  # the newest scheduler term heard: older ones are ignored
        self._prefetch_tasks: set[asyncio.Task] = set()  # held: a bare task may be collected
        self.energy: EnergyMeter | None = None  # set in run() where the GPU counts energy

    async def _on_engine(self, fn: Any, *args: Any) -> Any:
        """Run one engine call on the engine's thread."""
        return await self._engine_future(fn, *args)

    def _turn_in_hand(self) -> int | None:
        """The turn running, else the one queued (None: idle)."""
        return self.turn.command.turn_id if self.turn else self._queued_turn

    def _engine_future(self, fn: Any, *args: Any) -> asyncio.Future:
        """Queue one engine call on the engine's thread (calls run one at a time, in order)."""
        return asyncio.get_running_loop().run_in_executor(self._engine_thread, fn, *args)
