"""A fake scheduler + worker + model-store for gateway tests (the real ones are other services).

It speaks the real wire over the real NATS server: answers ``models.list`` and
``requests.submit``, "generates" a scripted text's tokens into ``tokens.<gateway-id>`` one
TokenBatch per step, honours ``requests.cancel``, and publishes heartbeats / scheduler state
when told to.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from nats.aio.msg import Msg

from aegaeon.bus import Bus
from aegaeon.protocol import (
    CancelRequest,
    Heartbeat,
    ModelInfo,
    ModelList,
    SchedulerState,
    SubmitReply,
    SubmitRequest,
    TokenBatch,
    TokenEvent,
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
    hang: bool = False  # accept and never send a token
    silent: bool = False  # take the submit and never answer it
    logprobs: bool = True


@dataclass
class FakeBackend:
    """See module docstring. ``submitted`` and ``cancelled`` record what the gateway sent."""

    bus: Bus
    models: list[ModelInfo]
    encode: Callable[[str], list[int]]  # the model's tokenizer
    eos_id: int
    script: Script = field(default_factory=Script)
    submitted: list[SubmitRequest] = field(default_factory=list)
    cancelled: list[CancelRequest] = field(default_factory=list)
    finished: set[str] = field(default_factory=set)
    _tasks: dict[str, asyncio.Task] = field(default_factory=dict)
    _subs: list = field(default_factory=list)

    async def start(self) -> None:
        s = self.bus.subjects
        nc = self.bus.nc
        self._subs = [
            await nc.subscribe(s.models("list"), cb=self._on_list),
            await nc.subscribe(s.submit, cb=self._on_submit),
            await self.bus.subscribe(s.cancel, CancelRequest, self._on_cancel),
        ]

    async def stop(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        subs, self._subs = self._subs, []
        for sub in subs:
            await sub.unsubscribe()

    async def _on_list(self, msg: Msg) -> None:
        await self.bus.reply(msg, ModelList(self.models))

    async def _on_submit(self, msg: Msg) -> None:
        from aegaeon.protocol import decode

        request = decode(msg.data, SubmitRequest)
        self.submitted.append(request)
        if self.script.silent:
            return
        if self.script.reject is not None:
            await self.bus.reply(msg, self.script.reject)
            return
        await self.bus.reply(msg, SubmitReply(accepted=True))
        if not self.script.hang:
            task = asyncio.create_task(self._generate(request, self.script))
            self._tasks[request.request_id] = task

    async def _on_cancel(self, cancel: CancelRequest, _msg: Msg) -> None:
        self.cancelled.append(cancel)
        task = self._tasks.pop(cancel.request_id, None)
        if task is not None:
            task.cancel()

    def expected_ids(self, max_tokens: int) -> list[int]:
        ids = list(self.encode(self.script.text))
        return ids[:max_tokens]

    async def _generate(self, request: SubmitRequest, script: Script) -> None:
        all_ids = [*self.encode(script.text), self.eos_id]
        limit = request.sampling.max_tokens
        subject = self.bus.subjects.tokens(request.gateway_id)
        sent = 0
        while True:
            await asyncio.sleep(script.step_s)
            if script.error_after is not None and sent >= script.error_after:
                event = TokenEvent(request.request_id, sent, [], error="worker lost its device")
                await self.bus.publish(subject, TokenBatch([event]))
                return
            ids = all_ids[sent : sent + script.tokens_per_step][: limit - sent]
            finish = None
            if ids and ids[-1] == self.eos_id:
                ids, finish = ids[:-1], "stop"
            elif sent + len(ids) >= limit:
                finish = "length"
            logprobs = (
                [(-0.5, [(t, -0.5), (0, -2.0)]) for t in ids]
                if request.sampling.logprobs is not None
                else []
            )
            event = TokenEvent(request.request_id, sent, ids, logprobs, finish_reason=finish)
            await self.bus.publish(subject, TokenBatch([event]))
            sent += len(ids)
            if finish:
                self.finished.add(request.request_id)
                self._tasks.pop(request.request_id, None)
                return

    async def beat(self, worker_id: str = "w0", resident: str | None = None) -> None:
        """One heartbeat and one scheduler state, as the live system sends every second."""
        beat = Heartbeat(worker_id, "cpu", "both", time.time(), resident_model=resident)
        await self.bus.publish(self.bus.subjects.heartbeat, beat)
        state = SchedulerState(
            time.time(), "aegaeon", [WorkerState(worker_id, "both", resident_model=resident)]
        )
        await self.bus.publish(self.bus.subjects.scheduler_state, state)
        await self.bus.nc.flush()
