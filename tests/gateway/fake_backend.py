"""A fake scheduler + worker + model-store for gateway tests (the real ones are other services).

It speaks the real wire over the real NATS server: answers ``models.list`` and
``requests.submit``, "generates" a scripted text's tokens into ``tokens.<gateway-id>`` one
TokenBatch per step (the last one ending with the EOS token, or with the first of the request's
``stop_token_ids`` the text holds, finish "stop" as a worker's does), records them
as a worker does in Redis when given ``record``, honours ``requests.cancel``, and publishes heartbeats / scheduler state
when told to. The admin API's verbs get a store's answers: ``models.describe``, ``drain`` and
``remove`` move its models by the real lifecycle rules, ``serving`` sets a known model's class
and pin, those given (404 otherwise), ``deploy`` refuses every path (400), ``scheduler.unload``
always unloads.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import msgspec
from nats.aio.msg import Msg

from aegaeon.bus import Bus
from aegaeon.lifecycle import Action, LifecycleError, next_state
from aegaeon.protocol import (
    CancelRequest,
    DeployModel,
    DescribeModel,
    DrainModel,
    Heartbeat,
    ModelInfo,
    ModelList,
    ModelReply,
    RemoveModel,
    RequestStatus,
    SchedulerState,
    SetServing,
    SubmitReply,
    SubmitRequest,
    TokenBatch,
    TokenEvent,
    UnloadModel,
    UnloadReply,
    WorkerState,
)


@dataclass
class Script:
    """What the fake engine does with the next requests."""

    text: str = "Hello wörld, 日本語 🙂 and the quick brown fox. STOP here. The end."
    step_s: float = 0.002
    tokens_per_step: int = 1
    reject: SubmitReply | None = None
    error_after: int | None = None  # send an error event after this many tokens
    error_suffix: str = ""  # ... to the requests whose id ends so (every one by default)
    hang: bool = False  # accept and never send a token
    silent: bool = False  # take the submit and never answer it
    unanswered: int = 0  # take this many submits first and never answer them
    logprobs: bool = True
    queued_ahead: int = 0  # the admission reply's queue position
    statuses: list[RequestStatus] = field(default_factory=list)  # sent before the first token
    lost_steps: set[int] = field(default_factory=set)  # steps lost in transit (still recorded)


@dataclass
class FakeBackend:
    """See module docstring. ``submitted`` and ``cancelled`` record what the gateway sent."""

    bus: Bus
    models: list[ModelInfo]
    encode: Callable[[str], list[int]]  # the model's tokenizer
    eos_id: int
    script: Script = field(default_factory=Script)
    record: Callable[[str, list[int]], Awaitable[None]] | None = None  # the worker's Redis record
    submitted: list[SubmitRequest] = field(default_factory=list)
    cancelled: list[CancelRequest] = field(default_factory=list)
    finished: set[str] = field(default_factory=set)
    _tasks: dict[str, asyncio.Task] = field(default_factory=dict)
    _subs: list = field(default_factory=list)
    _cancel_heard: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> None:
        s = self.bus.subjects
        nc = self.bus.nc
        self._subs = [
            await nc.subscribe(s.models("list"), cb=self._on_list),
            await nc.subscribe(s.submit, cb=self._on_submit),
            await self.bus.subscribe(s.cancel, CancelRequest, self._on_cancel),
            await self.bus.subscribe(s.models("describe"), DescribeModel, self._on_describe),
            await self.bus.subscribe(s.models("deploy"), DeployModel, self._on_deploy),
            await self.bus.subscribe(s.models("drain"), DrainModel, self._on_drain),
            await self.bus.subscribe(s.models("remove"), RemoveModel, self._on_remove),
            await self.bus.subscribe(s.models("serving"), SetServing, self._on_serving),
            await self.bus.subscribe(s.unload_model, UnloadModel, self._on_unload),
        ]

    async def stop(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        subs, self._subs = self._subs, []
        for sub in subs:
            await sub.unsubscribe()

    async def _on_list(self, msg: Msg) -> None:
        await self.bus.reply(msg, ModelList(self.models))

    def _model(self, name: str) -> ModelInfo | None:
        return next((m for m in self.models if m.name == name), None)

    async def _on_describe(self, request: DescribeModel, msg: Msg) -> None:
        info = self._model(request.name)
        reply = ModelReply(info) if info else ModelReply(error="not registered", status=404)
        await self.bus.reply(msg, reply)

    async def _on_deploy(self, request: DeployModel, msg: Msg) -> None:
        error = f"{request.path}: no config.json (not a Hugging Face model folder)"
        await self.bus.reply(msg, ModelReply(error=error, status=400))

    async def _move(self, name: str, action: Action, msg: Msg) -> None:
        info = self._model(name)
        try:
            state = next_state(name, info.state if info else None, action)
        except LifecycleError as exc:
            await self.bus.reply(msg, ModelReply(error=exc.message, status=exc.status))
            return
        assert info is not None
        others = [m for m in self.models if m.name != name]
        moved = msgspec.structs.replace(info, state=state or info.state)
        self.models = others if state is None else [moved, *others]
        await self.bus.reply(msg, ModelReply(moved))

    async def _on_drain(self, request: DrainModel, msg: Msg) -> None:
        await self._move(request.name, "drain", msg)

    async def _on_remove(self, request: RemoveModel, msg: Msg) -> None:
        await self._move(request.name, "remove", msg)

    async def _on_serving(self, request: SetServing, msg: Msg) -> None:
        info = self._model(request.name)
        if info is None:
            await self.bus.reply(msg, ModelReply(error="not registered", status=404))
            return
        moved = msgspec.structs.replace(
            info,
            priority=info.priority if request.priority is None else request.priority,
            pin=info.pin if request.pin is None else request.pin,
        )
        self.models = [moved, *(m for m in self.models if m.name != request.name)]
        await self.bus.reply(msg, ModelReply(moved))

    async def _on_unload(self, _request: UnloadModel, msg: Msg) -> None:
        await self.bus.reply(msg, UnloadReply(True))

    async def _on_submit(self, msg: Msg) -> None:
        from aegaeon.protocol import decode

        request = decode(msg.data, SubmitRequest)
        self.submitted.append(request)
        if self.script.silent or len(self.submitted) <= self.script.unanswered:
            return
        if self.script.reject is not None:
            await self.bus.reply(msg, self.script.reject)
            return
        await self.bus.reply(msg, SubmitReply(accepted=True, queued_ahead=self.script.queued_ahead))
        if not self.script.hang:
            task = asyncio.create_task(self._generate(request, self.script))
            self._tasks[request.request_id] = task

    async def cancels_of(self, request_id: str, timeout: float = 30.0) -> list[CancelRequest]:
        """The cancels heard for ``request_id``, after waiting for the first one to arrive.

        The gateway publishes a cancel and moves on, so it can reach this backend after the
        gateway has settled; a test waits for the message itself, not for a fixed time.
        """
        async with asyncio.timeout(timeout):
            while not any(c.request_id == request_id for c in self.cancelled):
                self._cancel_heard.clear()
                await self._cancel_heard.wait()
        return [c for c in self.cancelled if c.request_id == request_id]

    async def _on_cancel(self, cancel: CancelRequest, _msg: Msg) -> None:
        self.cancelled.append(cancel)
        self._cancel_heard.set()
        task = self._tasks.pop(cancel.request_id, None)
        if task is not None:
            task.cancel()

    def expected_ids(self, max_tokens: int) -> list[int]:
        ids = list(self.encode(self.script.text))
        return ids[:max_tokens]

    async def _generate(self, request: SubmitRequest, script: Script) -> None:
        all_ids = [*self.encode(script.text), self.eos_id]
        stops = {self.eos_id, *request.sampling.stop_token_ids}
        all_ids = all_ids[: next(i for i, t in enumerate(all_ids) if t in stops) + 1]
        limit = request.sampling.max_tokens
        subject = self.bus.subjects.tokens(request.gateway_id)
        for status in script.statuses:
            event = TokenEvent(request.request_id, 0, [], status=status)
            await self.bus.publish(subject, TokenBatch([event]))
        sent = step = 0
        while True:
            await asyncio.sleep(script.step_s)
            failing = script.error_after is not None and request.request_id.endswith(script.error_suffix)  # fmt: skip
            if failing and sent >= (script.error_after or 0):
                event = TokenEvent(request.request_id, sent, [], error="worker lost its device")
                await self.bus.publish(subject, TokenBatch([event]))
                return
            ids = all_ids[sent : sent + script.tokens_per_step][: limit - sent]
            finish = None
            if ids and ids[-1] in stops:
                finish = "stop"  # the stop token is sent, as a worker sends it
            elif sent + len(ids) >= limit:
                finish = "length"
            logprobs = (
                [(-0.5, [(t, -0.5), (0, -2.0)]) for t in ids]
                if request.sampling.logprobs is not None
                else []
            )
            event = TokenEvent(request.request_id, sent, ids, logprobs, finish_reason=finish)
            if self.record is not None:
                await self.record(request.request_id, ids)
            if step not in script.lost_steps:
                await self.bus.publish(subject, TokenBatch([event]))
            sent, step = sent + len(ids), step + 1
            if finish:
                self.finished.add(request.request_id)
                self._tasks.pop(request.request_id, None)
                return

    async def beat(
        self,
        worker_id: str = "w0",
        resident: str | None = None,
        queued: dict[str, int] | None = None,
        running: dict[str, int] | None = None,
    ) -> None:
        """One heartbeat and one scheduler state, as the live system sends every second."""
        beat = Heartbeat(worker_id, "cpu", "both", time.time(), resident_model=resident)
        await self.bus.publish(self.bus.subjects.heartbeat, beat)
        workers = [WorkerState(worker_id, "both", resident_model=resident)]
        state = SchedulerState(
            time.time(), "aegaeon", workers, queued=queued or {}, running=running or {}
        )
        await self.bus.publish(self.bus.subjects.scheduler_state, state)
        await self.bus.nc.flush()
