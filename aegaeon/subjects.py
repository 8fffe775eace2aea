"""NATS subjects, defined once (DESIGN.md §4). The prefix is configurable (``AEGAEON_PREFIX``)."""

from __future__ import annotations

import re
from dataclasses import dataclass

_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,128}")


def subject_token(value: str) -> str:
    """``value`` if it can stand as one subject token (a worker or gateway id): letters, digits,
    ``_`` and ``-``. A dot would split it into two tokens (and its events would miss the
    scheduler's ``worker.*.events``); ``*``, ``>`` and spaces are NATS syntax. Raises
    ValueError, which argparse reports as a bad option value."""
    if not _TOKEN.fullmatch(value):
        raise ValueError(f"{value!r}: use 1-128 letters, digits, '_' or '-' (no dots or spaces)")
    return value


def host_token(hostname: str) -> str:
    """A hostname as a subject token (``node1.example.com`` → ``node1-example-com``)."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", hostname)[:100] or "host"


@dataclass(frozen=True)
class Subjects:
    """All subjects under one prefix. Build with ``Subjects(prefix)``; default prefix ``aegaeon``."""

    prefix: str = "aegaeon"

    @property
    def submit(self) -> str:
        """gateway → scheduler, request/reply: admit a request (SubmitRequest → SubmitReply)."""
        return f"{self.prefix}.requests.submit"

    @property
    def cancel(self) -> str:
        """gateway → scheduler: a client went away (CancelRequest)."""
        return f"{self.prefix}.requests.cancel"

    def worker_cmd(self, worker_id: str) -> str:
        """scheduler → one worker: WorkerCommand."""
        return f"{self.prefix}.worker.{worker_id}.cmd"

    def worker_events(self, worker_id: str) -> str:
        """one worker → scheduler: WorkerEvent."""
        return f"{self.prefix}.worker.{worker_id}.events"

    @property
    def all_worker_events(self) -> str:
        """The scheduler's wildcard over every worker's events."""
        return f"{self.prefix}.worker.*.events"

    @property
    def heartbeat(self) -> str:
        """worker → everyone: Heartbeat."""
        return f"{self.prefix}.worker.heartbeat"

    def tokens(self, gateway_id: str) -> str:
        """worker → the gateway that owns the request: TokenBatch."""
        return f"{self.prefix}.tokens.{gateway_id}"

    def models(self, verb: str) -> str:
        """anyone ↔ model-store, request/reply: verb is list, describe, ensure, prefetch, file;
        the gateway's admin API also asks deploy, drain, remove (lifecycle) and serving (a
        model's serving settings: priority class, pin, keep-alive); the scheduler tells every
        store (no queue group) evict: a model idle past its keep-alive; a store asks another
        node's store ``share.<store id>`` for its cached copy of a model's weights."""
        return f"{self.prefix}.models.{verb}"

    @property
    def store_heartbeat(self) -> str:
        """model-store → scheduler: StoreHeartbeat (what one node's host cache holds)."""
        return f"{self.prefix}.models.heartbeat"

    @property
    def registry_changed(self) -> str:
        """model-store → gateways, scheduler, model-stores: ModelChanged (a lifecycle move)."""
        return f"{self.prefix}.registry.changed"

    @property
    def unload_model(self) -> str:
        """gateway → scheduler, request/reply: evict a drained model before its removal
        (UnloadModel → UnloadReply)."""
        return f"{self.prefix}.scheduler.unload"

    @property
    def scheduler_state(self) -> str:
        """scheduler → observers (``aegaeon top``, gateway /v1/models): a periodic SchedulerState."""
        return f"{self.prefix}.scheduler.state"
