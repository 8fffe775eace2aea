"""The scheduler service's test harness: the real scheduler against real NATS and Redis, with
fake workers, a fake model-store and a fake gateway written here (they stand in for the other
services).

A fake worker emits token ``1000 + index`` for output position ``index`` of any request, so the
stream a client sees is the same whichever worker produced it: a recovery that re-sends or skips
a token shows up as a wrong or missing index. ``HandoffScript`` is a scripted two-role policy for
the prefill → decode hand-off tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
import uuid
from collections import defaultdict
from typing import Any

import pytest
import redis.asyncio as aioredis
from aegaeon.scheduler.policies.base import (
    Policy,
    Rejection,
    RequestView,
    Slo,
    TurnPlan,
    TurnResult,
)
from aegaeon.scheduler.service import SchedulerConfig, SchedulerService
from aegaeon.scheduler.store import RequestStore

from aegaeon.bus import Bus
from aegaeon.config import BusConfig
from aegaeon.protocol import (
    AbortRequest,
    AssignRequest,
    Heartbeat,
    KVHandle,
    KVImported,
    ListModels,
    ModelInfo,
    ModelList,
    RequestDone,
    RunTurn,
    SamplingParams,
    SchedulerState,
    SubmitReply,
    SubmitRequest,
    TokenBatch,
    TokenEvent,
    TurnDone,
    WorkerCommand,
)
from aegaeon.state import Keys

GATEWAY = "gw1"
CONTEXT = 64


async def wait_for(condition, timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll ``condition`` (a function; it may return an awaitable, e.g. a Redis read) every
    20 ms until it gives something truthy, and return that. The deadline is generous: the
    awaited event comes in well under a second, but CI machines are often busy."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


FINAL_STATES = (b"finished", b"cancelled", b"error")


async def final_state(harness: Harness, rid: str) -> bytes:
    """``rid``'s state in Redis once the scheduler has written its end there. The scheduler
    tells the gateway (and the worker) first and writes Redis after, so a test that saw the
    end on the bus waits for the write before it reads what it says."""

    async def ended() -> bytes | None:
        state = await harness.redis.hget(harness.keys.request(rid), "state")
        return state if state in FINAL_STATES else None

    return await wait_for(ended, what=f"the scheduler to write {rid}'s end to Redis")


class FakeWorker:
    """Heartbeats; holds assigned requests; answers each RunTurn with ``tokens_per_turn`` tokens
    per request (to the gateway and the Redis output list, like the real worker), then TurnDone."""

    def __init__(
        self, bus: Bus, redis: aioredis.Redis, worker_id: str, tokens_per_turn: int = 1,
        role: str = "both", node: str = "", kv_endpoint: str = "",
    ) -> None:  # fmt: skip
        self.bus, self.redis, self.worker_id = bus, redis, worker_id
        self.keys = Keys(bus.config.prefix)
        self.tokens_per_turn = tokens_per_turn
        self.commands: list[Any] = []
        self.held: dict[str, AssignRequest] = {}
        self.produced: dict[str, int] = {}
        self.answer = True  # False: record turns but leave them unanswered
        self.die_after_turns: int | None = None
        self.draining = False
        self.crash_on_last_token = False
        self.role = role
        self.node = node  # same non-empty node: prefill exports KV, decode imports it
        self.kv_endpoint = kv_endpoint  # set: it serves exported KV to other nodes too
        self.import_ok = True  # what a KVImported this worker sends says
        self.reports_imports = True  # False: the test sends KVImported itself (or never)
        self.turn_done_extras: dict[str, Any] = {}  # more TurnDone fields (switch bytes…)
        self.weight_budget_bytes = 0  # 0: not reported
        self.slot_bytes = 0
        self.alive = True
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> FakeWorker:
        subject = self.bus.subjects.worker_cmd(self.worker_id)
        self._sub = await self.bus.subscribe(subject, WorkerCommand, self._on_command)
        self._tasks.append(asyncio.create_task(self._beat()))
        return self

    async def _beat(self) -> None:
        while self.alive:
            beat = Heartbeat(
                self.worker_id, "cpu", self.role, time.time(), kv_blocks_total=64,  # type: ignore[arg-type]
                kv_blocks_free=64, num_requests=len(self.held), draining=self.draining,
                weight_budget_bytes=self.weight_budget_bytes, slot_bytes=self.slot_bytes, node=self.node,
                kv_endpoint=self.kv_endpoint,
            )  # fmt: skip
            await self.bus.publish(self.bus.subjects.heartbeat, beat)
            await asyncio.sleep(0.1)

    def kill(self) -> None:
        """Go silent, as a crashed process does."""
        self.alive = False

    async def stop(self) -> None:
        self.kill()
        await self._sub.unsubscribe()
        for task in self._tasks:
            task.cancel()

    def of_type(self, kind: type) -> list[Any]:
        return [c for c in self.commands if isinstance(c, kind)]

    async def _on_command(self, command: Any, _msg: Any) -> None:
        if not self.alive:
            return
        self.commands.append(command)
        if isinstance(command, AssignRequest) and command.request_id not in self.held:
            self.held[command.request_id] = command  # a repeated assign changes nothing
            self.produced[command.request_id] = len(command.output_token_ids)
            if command.kv is not None and command.kv_source is not None and self.reports_imports:
                imported = KVImported(self.worker_id, command.request_id, command.kv_source,
                                      ok=self.import_ok, bytes=command.kv.nbytes)  # fmt: skip
                await self._event(imported)
        elif isinstance(command, AbortRequest) and command.request_id in self.held:
            del self.held[command.request_id]
            await self._event(RequestDone(self.worker_id, command.request_id, "abort", 0))
        elif isinstance(command, RunTurn) and self.answer:
            await self.run_turn(command)

    async def run_turn(self, turn: RunTurn) -> None:
        finished: list[str] = []
        for _ in range(1 if turn.prefill_only else self.tokens_per_turn):
            for rid in [r for r in turn.request_ids if r in self.held]:
                if await self._emit(rid):
                    finished.append(rid)
        if not self.alive:
            return
        progress = {rid: self.produced[rid] for rid in self.held}
        exported = {rid: kv_handle(self.worker_id, self.held[rid], self.produced[rid], self.kv_endpoint)
                    for rid in turn.export_kv if rid in self.held}  # fmt: skip
        await self._event(
            TurnDone(self.worker_id, turn.turn_id, turn.model, steps=self.tokens_per_turn,
                     elapsed_s=0.01, finished=finished, progress=progress, exported=exported,
                     **self.turn_done_extras)
        )  # fmt: skip
        self.die_after_turns = None if self.die_after_turns is None else self.die_after_turns - 1
        if self.die_after_turns == 0:
            self.kill()

    async def _emit(self, rid: str) -> bool:
        """One token for ``rid``; True when that ended it."""
        request = self.held[rid]
        index = self.produced[rid]
        self.produced[rid] = index + 1
        done = index + 1 >= request.sampling.max_tokens
        event = TokenEvent(rid, index, [1000 + index], finish_reason="length" if done else None)
        await self.bus.publish(self.bus.subjects.tokens(request.gateway_id), TokenBatch([event]))
        with contextlib.suppress(Exception):  # Redis down: recovery re-runs from fewer tokens
            await self.redis.rpush(self.keys.output_tokens(rid), 1000 + index)
        if done and self.crash_on_last_token:
            self.kill()  # the client has every token; the scheduler never hears it ended
            return False
        if done:
            del self.held[rid]
            await self._event(RequestDone(self.worker_id, rid, "length", index + 1))
        return done

    async def _event(self, event: Any) -> None:
        await self.bus.publish(self.bus.subjects.worker_events(self.worker_id), event)


def kv_handle(worker_id: str, request: AssignRequest, produced: int, endpoint: str = "") -> KVHandle:  # fmt: skip
    """A handle to KV that only the fake workers pretend exists (prompt + outputs - 1 tokens)."""
    tokens = len(request.prompt_token_ids) + produced - 1
    return KVHandle(f"/dev/shm/fake-{worker_id}", 0, 4096, tokens, 1, 16, 2, 2, 8, "float32",
                    endpoint=endpoint, token=b"t" * 16 if endpoint else b"")  # fmt: skip


class Harness:
    """One isolated deployment (its own subject/key prefix) on the session's servers."""

    def __init__(self, nats_url: str, redis_url: str) -> None:
        self.config = BusConfig(
            nats_url=nats_url, redis_url=redis_url, prefix=f"t{uuid.uuid4().hex[:10]}"
        )
        self.keys = Keys(self.config.prefix)
        self.tokens: dict[str, list[TokenEvent]] = defaultdict(list)
        self.states: list[SchedulerState] = []
        self.workers: list[FakeWorker] = []
        self.model_names = ["a", "b"]  # what the fake model-store has registered
        self.model_states: dict[str, Any] = {}  # name → lifecycle state (absent: ready)
        self._schedulers: list[tuple[asyncio.Event, asyncio.Task, Bus]] = []

    async def open(self) -> Harness:
        self.bus = await Bus.connect(self.config, "test")
        self.redis = aioredis.Redis.from_url(self.config.redis_url)
        subjects = self.bus.subjects
        await self.bus.subscribe(subjects.models("list"), ListModels, self._list_models)
        await self.bus.subscribe(subjects.tokens(GATEWAY), TokenBatch, self._on_tokens)
        await self.bus.subscribe(subjects.scheduler_state, SchedulerState, self._on_state)
        return self

    async def _list_models(self, _query: Any, msg: Any) -> None:
        models = [
            ModelInfo(name, "LlamaForCausalLM", "llama", f"/models/{name}", 1 << 20, 1 << 18,
                      CONTEXT, "float32", kv_bytes_per_token=256,
                      state=self.model_states.get(name, "ready"))
            for name in self.model_names
        ]  # fmt: skip
        await self.bus.reply(msg, ModelList(models))

    async def _on_tokens(self, batch: TokenBatch, _msg: Any) -> None:
        for event in batch.events:
            self.tokens[event.request_id].append(event)

    async def _on_state(self, state: SchedulerState, _msg: Any) -> None:
        self.states.append(state)

    async def worker(self, worker_id: str, **options: Any) -> FakeWorker:
        worker = await FakeWorker(self.bus, self.redis, worker_id, **options).start()
        self.workers.append(worker)
        return worker

    async def scheduler(self, wait_ready: bool = True, **options: Any) -> SchedulerService:
        """A scheduler service running on this harness; returned once ready (``wait_ready``:
        it has resumed, workers heard) or at once."""
        settings: dict[str, Any] = {
            "policy": "round-robin",
            "policy_options": {"quota_s": 0.05},
            "heartbeat_timeout_s": 1.5,  # 15 beats: a loaded CI machine stalls, it does not die
            "check_interval_s": 0.05,
            "state_interval_s": 0.1,
            "models_wait_s": 2.0,
        }
        settings.update(options)
        bus = await Bus.connect(self.config, "scheduler")
        store = RequestStore(aioredis.Redis.from_url(self.config.redis_url), self.config.prefix)
        factory = settings.pop("estimator_factory", None)
        service = SchedulerService(SchedulerConfig(**settings), bus, store, factory)
        stop = asyncio.Event()
        task = asyncio.create_task(service.run(stop))
        self._schedulers.append((stop, task, bus))
        if wait_ready:
            await asyncio.wait_for(service.ready.wait(), 30.0)
        return service

    async def stop_scheduler(self, index: int = -1) -> None:
        stop, task, bus = self._schedulers.pop(index)
        stop.set()
        await asyncio.wait_for(task, 30.0)
        await bus.close()

    async def submit(
        self, rid: str, model: str = "a", max_tokens: int = 3, prompt_len: int = 4
    ) -> SubmitReply:
        request = SubmitRequest(
            rid, model, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens),
            GATEWAY, time.time(),
        )  # fmt: skip
        return await self.bus.request(self.bus.subjects.submit, request, SubmitReply)

    def finished(self, rid: str) -> bool:
        return any(e.finish_reason for e in self.tokens[rid])

    def stream(self, rid: str) -> list[tuple[int, list[int]]]:
        return [(e.start, e.token_ids) for e in self.tokens[rid] if e.token_ids]

    async def close(self) -> None:
        while self._schedulers:
            await self.stop_scheduler()
        for worker in self.workers:
            await worker.stop()
        await self.bus.close()
        await self.redis.aclose()


@pytest.fixture
async def harness(nats_server, redis_server):
    h = await Harness(nats_server.url, redis_server.url).open()
    yield h
    with contextlib.suppress(Exception):
        await h.close()


def expected_stream(n: int) -> list[tuple[int, list[int]]]:
    return [(i, [1000 + i]) for i in range(n)]


class HandoffScript(Policy):
    """A scripted two-role policy: prefill on instance "p", then hand the request to "d"."""

    name = "test-handoff"

    def __init__(self, models: Any, slo: Slo, estimator: Any = None) -> None:
        super().__init__(models, slo, estimator)
        self.queues: dict[str, list[str]] = {"p": [], "d": []}
        self.busy: set[str] = set()

    def submit(self, request: RequestView, now: float) -> Rejection | None:
        request.instance_id = "p"
        self.requests[request.request_id] = request
        self.queues["p"].append(request.request_id)
        return None

    def next_turn(self, instance_id: str, now: float) -> TurnPlan | None:
        ids = self.queues.get(instance_id)
        if instance_id in self.busy or not ids:
            return None
        self.busy.add(instance_id)
        prefill = instance_id == "p"
        handoff = dict.fromkeys(ids, "d") if prefill else {}
        model = self.requests[ids[0]].model
        return TurnPlan(instance_id, model, list(ids), 0.05, prefill_only=prefill, handoff=handoff)

    def turn_done(self, instance_id: str, plan: TurnPlan, result: TurnResult, now: float) -> None:
        self.busy.discard(instance_id)
        for rid in result.finished:
            self.cancel(rid)
        for rid, target in plan.handoff.items():
            if rid in self.requests:
                self.queues[instance_id].remove(rid)
                self.queues[target].append(rid)
                self.requests[rid].instance_id = target

    def remove_instance(self, instance_id: str) -> list[RequestView]:
        self.busy.discard(instance_id)  # its turn died with it
        lost = super().remove_instance(instance_id)
        for request in lost:
            self.cancel(request.request_id)
        return lost

    def cancel(self, request_id: str) -> None:
        self.requests.pop(request_id, None)
        for queue in self.queues.values():
            if request_id in queue:
                queue.remove(request_id)
