"""The models the scheduler serves: the model-store's registry (asked at start, every few
seconds, and when a request names a model it does not know), each model's lifecycle state (kept
current by the store's ``registry.changed``), and the gateway's request to unload a drained model
before its removal (``scheduler.unload``)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aegaeon.scheduler.books import counts_by_model, model_spec
from aegaeon.scheduler.core import ServiceCore

from aegaeon.lifecycle import Refusal, serving_refusal
from aegaeon.protocol import (
    EvictModel,
    ListModels,
    ModelChanged,
    ModelInfo,
    ModelList,
    UnloadModel,
    UnloadReply,
)

log = logging.getLogger(__name__)


class ModelRegistry(ServiceCore):
    """The registry as the scheduler sees it, and the unloading of a drained model."""

    async def _load_models(self, wait_s: float = 0.0) -> None:
        """Ask the model-store for the registry; new models are told to the policy, models the
        registry no longer holds are forgotten (unless requests of them are still in flight)."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                reply = await self.bus.request(
                    self.subjects.models("list"), ListModels(), ModelList, timeout=2.0
                )
                break
            except Exception as exc:  # no model-store (yet): try again later
                if time.monotonic() >= deadline:
                    log.debug("model list unavailable: %s", exc)
                    return
                await asyncio.sleep(0.2)
        for info in reply.models:
            self._know_model(info)
        listed = {info.name for info in reply.models}
        queued, running = counts_by_model(self.requests)
        for name in [m for m in self.models if m not in listed | set(queued) | set(running)]:
            self._forget_model(name)

    def _know_model(self, info: ModelInfo) -> None:
        """A model as the store describes it now: its spec (told to the estimator and the policy
        when new or changed) and its lifecycle state."""
        spec = model_spec(info)
        if self.models.get(info.name) != spec:
            self.models[info.name] = spec
            add_to_estimator = getattr(self.estimator, "add_model", None)
            if add_to_estimator is not None:  # its step times: before the policy plans with them
                add_to_estimator(spec)
            if self.policy is not None:
                self.policy.add_model(spec)
        self.model_states[info.name] = (info.state, info.state_reason)
        self.keep_alive_s[info.name] = info.keep_alive_s

    def _forget_model(self, name: str) -> None:
        """Removed: its requests are refused as unknown, and once none of it is queued or
        running (a removal follows an unload, so none is), the policy forgets it too: a pinned
        model stops being kept anywhere."""
        self.models.pop(name, None)
        self.model_states.pop(name, None)
        self.keep_alive_s.pop(name, None)
        queued, running = counts_by_model(self.requests)
        if name in queued or name in running:
            return
        if self.policy is not None:
            self.policy.remove_model(name)
        remove_from_estimator = getattr(self.estimator, "remove_model", None)
        if remove_from_estimator is not None:
            remove_from_estimator(name)

    def _loading(self, name: str) -> bool:
        """Last heard as loading: the one state that ends on its own (drains and failures end
        only by an admin's call, whose news comes)."""
        return self.model_states.get(name, ("ready", ""))[0] == "loading"

    def _model_refusal(self, name: str) -> Refusal | None:
        """How to refuse a new request of ``name`` by its lifecycle state (None: it is ready)."""
        state, reason = self.model_states.get(name, ("ready", ""))
        return serving_refusal(name, state, reason)

    async def _on_model_changed(self, change: ModelChanged, _msg: Any) -> None:
        if change.removed:
            self._forget_model(change.model.name)
        else:
            self._know_model(change.model)
            log.info("model %s is %s", change.model.name, change.model.state)

    async def _on_unload(self, request: UnloadModel, msg: Any) -> None:
        """Unload a drained model if nothing of it is queued or running: from now on its new
        requests are refused, and every worker evicts it (after its turn in progress, which
        cannot be one of this model: none of its requests is left)."""
        queued, running = counts_by_model(self.requests)
        name = request.name
        waiting, decoding = queued.get(name, 0), running.get(name, 0)
        if waiting or decoding:
            await self.bus.reply(msg, UnloadReply(False, waiting, decoding))
            return
        if name in self.models:  # keep refusing it until the store's removal is heard
            self.model_states[name] = ("draining", "")
        workers = sorted(self.workers)
        for worker_id in workers:
            await self.bus.publish(self.subjects.worker_cmd(worker_id), EvictModel(name))
        log.info("unloaded %s from %d workers", name, len(workers))
        await self.bus.reply(msg, UnloadReply(True, workers=workers))
