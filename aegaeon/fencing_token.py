"""The fencing token of scheduler leadership terms, as NATS headers carry it. Pure.

Each term of a leading scheduler has an epoch larger than every earlier term's (taken with the
lease in Redis, ``aegaeon.scheduler.leadership``). The term's bus puts it on every message it
sends (the ``Aegaeon-Epoch`` header); a worker remembers the largest epoch it has heard and drops
commands that carry a smaller one: a paused ex-leader that wakes up and sends before its own
deadline check runs cannot move a worker that already obeys its successor. A sole scheduler
(no lease) sends no epoch, and a message without one is always taken.
"""

from __future__ import annotations

from collections.abc import Mapping

EPOCH_HEADER = "Aegaeon-Epoch"


def epoch_headers(epoch: int) -> dict[str, str]:
    """The header a term's messages carry (none for epoch 0: a sole scheduler)."""
    return {EPOCH_HEADER: str(epoch)} if epoch > 0 else {}


class EpochFence:
    """One receiver's memory of the newest term it has heard."""

    def __init__(self) -> None:
        self.newest = 0

    def admits(self, headers: Mapping[str, str] | None) -> bool:
        """Whether a message with these headers comes from a term no older than the newest one
        heard (which it then becomes, when newer). No epoch (or an unreadable one): admitted."""
        raw = (headers or {}).get(EPOCH_HEADER)
        try:
            epoch = int(raw) if raw is not None else 0
        except ValueError:
            return True
        if epoch <= 0:
            return True
        if epoch < self.newest:
            return False
        self.newest = epoch
        return True
