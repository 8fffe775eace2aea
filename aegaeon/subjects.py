"""NATS subjects, defined once (DESIGN.md §4). The prefix is configurable (``AEGAEON_PREFIX``)."""

from __future__ import annotations

from dataclasses import dataclass


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
        """anyone ↔ model-store, request/reply: verb is list, describe, ensure, prefetch, file."""
        return f"{self.prefix}.models.{verb}"

    @property
    def scheduler_state(self) -> str:
        """scheduler → observers (``aegaeon top``, gateway /v1/models): a periodic SchedulerState."""
        return f"{self.prefix}.scheduler.state"
