"""Redis keys, defined once. Every key expires but the one epoch key of a deployment, so nothing
grows without bound.

``<prefix>:req:<id>``      hash  request metadata: state, model, gateway, prompt_len, output_len,
                                 arrival, first_token_at, finished_at, finish_reason, worker
``<prefix>:req:<id>:out``  list  output token ids already sent to the client (for recovery)
``<prefix>:queue``         hash  request id → packed SubmitRequest, for requests the scheduler
                                 has accepted but not finished (a restarted scheduler resumes them)
``<prefix>:scheduler:leader`` string  the leader lease: ``<scheduler id>:<pid>:<nonce>`` of the one
                                 scheduler that schedules; expires unless renewed (a few seconds)
``<prefix>:scheduler:leader:epoch`` string  the last term's fencing epoch (the lease key +
                                 ``:epoch``, kept by ``RedisLease`` in the scheduler's leadership.py;
                                 it does not expire: the next term's epoch must exceed it)
"""

from __future__ import annotations

from dataclasses import dataclass

REQUEST_TTL_S = 3600
"""Metadata of a request lives this long after its last update."""
OUTPUT_AFTER_FINISH_S = 120
"""A finished request's recorded output tokens live this long (a gateway that lost the last
events in a bus restart completes its stream from them)."""


@dataclass(frozen=True)
class Keys:
    """Redis key names under one prefix."""

    prefix: str = "aegaeon"

    def request(self, request_id: str) -> str:
        return f"{self.prefix}:req:{request_id}"

    def output_tokens(self, request_id: str) -> str:
        return f"{self.prefix}:req:{request_id}:out"

    @property
    def queue(self) -> str:
        return f"{self.prefix}:queue"

    @property
    def scheduler_leader(self) -> str:
        return f"{self.prefix}:scheduler:leader"
