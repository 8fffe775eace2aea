"""The contract between scheduling policies and whatever drives them.

A policy is pure logic (no I/O, no clock of its own): the scheduler service drives it with
real workers over NATS, and the simulator (:mod:`aegaeon.sim`) drives the very same classes
against a cost model. Both call it the same way::

    policy.add_instance(InstanceView(...))          # a worker joined (heartbeat)
    policy.submit(RequestView(...), now)             # a request arrived → None or a Rejection
    plan = policy.next_turn(instance_id, now)        # an instance is idle: what should it run?
    ...the instance executes plan (switch, prefill/decode steps for plan.quota_s)...
    policy.turn_done(instance_id, plan, TurnResult(...), now)
    policy.prefetch_now(instance_id)                 # after each event: stage a model?
    policy.cancel(request_id)                        # client went away
    lost = policy.remove_instance(instance_id)       # worker died → requests to re-run

A driver asks ``next_turn`` for every idle instance after each event (a policy returns None
when that instance has nothing to do now), then ``prefetch_now`` for every instance. A policy
returns None from ``next_turn`` only for an instance that holds no work, and that call changes
nothing: the simulator relies on it to ask only the instances an event gave work. An idle
instance gets something to stage from ``prefetch_now`` only when first asked after its turn
ended (the simulator asks it then, and later calls answer None).

Models have priority classes (``ModelSpec.priority``, :mod:`aegaeon.priority`): where a policy
orders work of several models, a higher class goes first, and a request that has waited
``max_wait_s`` (a driver may set it) for its first token goes before every class
(:meth:`Policy.ranks`). With one class throughout, every policy orders as it would without them.

Where weights are is an optional hint: a driver that knows which node each instance is on
(``InstanceView.node``) and what each node's host memory caches sets ``policy.locality`` (a
:class:`WeightLocality`); placement then prefers instances whose node already holds the model
and weighs the time to bring it there (:meth:`Policy.fetch_s`). Without it (None, the default)
every policy places exactly as if weights were everywhere.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Protocol

from aegaeon.priority import DEFAULT_MAX_WAIT_S, DEFAULT_PRIORITY, rank

InstanceRole = Literal["prefill", "decode", "both"]


@dataclass
class ModelSpec:
    """What a policy knows of a model: its size (switch cost), KV footprint per token, its
    priority class against other models' work (:mod:`aegaeon.priority`), and on how many
    instances it is pinned (kept in a weight slot, served there first)."""

    name: str
    weight_bytes: int
    kv_bytes_per_token: int
    context_length: int = 4096
    priority: str = "normal"
    pin: int = 0  # instances that keep it resident (policies that pin: aegaeon)


@dataclass
class RequestView:
    """A request as the policy tracks it. The driver creates it; the policy updates it."""

    request_id: str
    model: str
    prompt_len: int
    max_tokens: int
    arrival: float  # on the driver's clock: the one of every ``now`` the policy is given
    generated: int = 0  # tokens produced so far (the first comes from prefill)
    prefilled: bool = False
    instance_id: str | None = None  # where its KV lives / where it is queued

    @property
    def context_len(self) -> int:
        return self.prompt_len + self.generated


@dataclass
class InstanceView:
    """A worker as the policy sees it."""

    instance_id: str
    role: InstanceRole = "both"
    kv_capacity_tokens: int = 1 << 20  # KV tokens that fit on the device at once (all models)
    weight_budget_bytes: int = 1 << 40  # weights that fit on the device at once
    resident_model: str | None = None
    busy: bool = False
    node: str | None = None  # the server it is on (host memory, network link); None: unknown


@dataclass
class TurnPlan:
    """One turn for one instance: make ``model`` resident, then run ``request_ids``.

    ``quota_s`` bounds decode time after the switch; ``prefill_only`` ends the turn after the
    prefill step; ``swap_out_after`` moves the batch's KV to the host at the end;
    ``prefetch_model`` is staged during the turn. ``handoff`` maps request ids whose KV must go
    to another instance after this turn (prefill → decode) to that instance's id. ``drop_kv``:
    requests whose KV the instance drops before the turn (recomputed when they run again), as a
    ServerlessLLM instance loses its requests' KV when it unloads their model. ``pinned``: the
    model the instance keeps in a weight slot (never evicted by other models' switches).
    """

    instance_id: str
    model: str
    request_ids: list[str]
    quota_s: float
    prefill_only: bool = False
    swap_out_after: bool = False
    prefetch_model: str | None = None
    max_steps: int | None = None
    handoff: dict[str, str] = field(default_factory=dict)
    drop_kv: list[str] = field(default_factory=list)
    pinned: str | None = None


@dataclass
class TurnResult:
    """What executing a TurnPlan produced."""

    steps: int
    elapsed_s: float
    switch_s: float = 0.0
    finished: list[str] = field(default_factory=list)
    generated: dict[str, int] = field(default_factory=dict)  # request id → tokens so far
    # Measured engine time (what an estimator learns from, estimators.observe_turn): the
    # prefill step of a prefill-only turn, and pure decode steps (a turn's first step may
    # also prefill new members, so it is not among them).
    prefill_s: float = 0.0
    decode_steps: int = 0
    decode_s: float = 0.0


@dataclass
class Rejection:
    """Why a request cannot be admitted, and the HTTP status that says so."""

    reason: str
    status: int = 503
    retry_after: float | None = None


@dataclass(frozen=True)
class Slo:
    """Latency targets: time to first token and time between tokens, in seconds."""

    ttft_s: float = 10.0
    tbt_s: float = 0.1


class StepTimeEstimator(Protocol):
    """Predicted engine times, in seconds (``aegaeon.scheduler.estimators`` implements it)."""

    def prefill_time(self, model: str, prompt_lens: list[int]) -> float: ...

    def decode_time(self, model: str, context_lens: list[int]) -> float: ...

    def switch_time(self, model: str) -> float: ...


class WeightLocality(Protocol):
    """Where model weights are: what a switch on a node costs beyond the host → device copy."""

    def fetch_s(self, node: str, model: str) -> float:
        """Seconds until ``model``'s weights are in ``node``'s host memory if asked for now: 0
        when the node caches them, else the transfer from the model store or a peer node."""
        ...


class Policy(ABC):
    """A scheduling policy. Subclasses set ``name`` (the ``--policy`` value)."""

    name: ClassVar[str]
    locality: WeightLocality | None = None  # set by a driver that knows the nodes' caches
    max_wait_s: float = DEFAULT_MAX_WAIT_S  # a first token's wait past which classes stop counting

    def __init__(
        self,
        models: dict[str, ModelSpec],
        slo: Slo,
        estimator: StepTimeEstimator | None = None,
    ) -> None:
        self.models = models
        self.slo = slo
        self.estimator = estimator
        self.instances: dict[str, InstanceView] = {}
        self.requests: dict[str, RequestView] = {}

    def add_model(self, spec: ModelSpec) -> None:
        """A model was registered after start (or its spec changed: its class, its pin)."""
        self.models[spec.name] = spec

    def remove_model(self, name: str) -> None:
        """A model left the registry; the driver calls this only once none of its requests is
        queued or running here."""
        self.models.pop(name, None)

    def weights_evicted(self, name: str) -> None:
        """The model's weights left every instance (keep-alive unloaded it): its next turn
        anywhere pays a switch."""
        for view in self.instances.values():
            if view.resident_model == name:
                view.resident_model = None

    def add_instance(self, instance: InstanceView) -> None:
        """A worker joined."""
        self.instances[instance.instance_id] = instance

    def class_rank(self, model: str) -> int:
        """The rank of ``model``'s priority class (0: the highest)."""
        spec = self.models.get(model)
        return rank(spec.priority if spec is not None else DEFAULT_PRIORITY)

    def starving(self, request: RequestView, now: float) -> bool:
        """It has waited ``max_wait_s`` for its first token."""
        return not request.prefilled and now - request.arrival >= self.max_wait_s

    def ranks(self, request_ids: Iterable[str], now: float) -> dict[str, int]:
        """Each request's rank for ordering work of several models (lower goes first): its
        model's class rank, or -1, before every class, once it is :meth:`starving` — so no
        class starves another. Within a rank the policy's own order decides. Among requests of
        one class every rank is the same: the policy's order alone, as without classes."""
        own = {r: self.class_rank(self.requests[r].model) for r in request_ids}
        if len(set(own.values())) <= 1:
            return own
        return {r: -1 if self.starving(self.requests[r], now) else k for r, k in own.items()}

    def fetch_s(self, instance_id: str, model: str) -> float:
        """Seconds to bring ``model``'s weights to the node of ``instance_id`` before its
        host → device copy (0: cached there, or no locality hint, or node unknown)."""
        view = self.instances.get(instance_id)
        if self.locality is None or view is None or view.node is None:
            return 0.0
        return self.locality.fetch_s(view.node, model)

    def fetch_times(self, instance_ids: Iterable[str], model: str) -> dict[str, float]:
        """:meth:`fetch_s` of each instance, the hint asked once per node."""
        by_node: dict[str | None, float] = {}
        out = {}
        for instance_id in instance_ids:
            view = self.instances.get(instance_id)
            node = view.node if view is not None else None
            if node not in by_node:
                by_node[node] = self.fetch_s(instance_id, model)
            out[instance_id] = by_node[node]
        return out

    def remove_instance(self, instance_id: str) -> list[RequestView]:
        """A worker left or died: forget it and return the requests it held, reset so that
        they can be submitted again (the driver re-submits with the tokens already sent)."""
        self.instances.pop(instance_id, None)
        lost = [r for r in self.requests.values() if r.instance_id == instance_id]
        for request in lost:
            del self.requests[request.request_id]
        return lost

    @abstractmethod
    def submit(self, request: RequestView, now: float) -> Rejection | None:
        """Admit a request (queue it somewhere) or reject it."""

    @abstractmethod
    def next_turn(self, instance_id: str, now: float) -> TurnPlan | None:
        """The next turn for an idle instance, or None when it has nothing to do."""

    @abstractmethod
    def turn_done(self, instance_id: str, plan: TurnPlan, result: TurnResult, now: float) -> None:
        """Book-keeping after a turn: progress, finished requests, estimator updates."""

    @abstractmethod
    def cancel(self, request_id: str) -> None:
        """Forget a request (client cancelled or it ended with an error)."""

    def prefetch_now(self, instance_id: str) -> str | None:
        """A model to copy into the instance's free weight slot now. Busy: because the turn
        expected after the running one changed since that turn was planned (a request
        arrived). Idle with nothing to run, first asked since its turn ended: one the next
        arrival is likely to want. None: leave the slot as it is. Drivers ask after each
        event; policies that do not prefetch never stage."""
        return None
