"""The leader lease's arithmetic (pure, no I/O): who holds it, and until when the holder may act.

The lease is one Redis key, ``<prefix>:scheduler:leader`` (``aegaeon.state.Keys``), whose value
names the holder and which expires ``ttl_s`` after it was last set or extended. Redis applies the
expiry when it runs the command, which is after the holder sent it; so a holder that counts
``ttl_s`` from the moment it *sent* a command Redis confirmed never counts past the real expiry.
It stops acting ``margin_s`` earlier still, which is the room left for a message checked just
before the deadline to reach the wire, and for clocks that run at slightly different rates::

    sent ─────────── renew_s ──────────── renew ─ … ─ deadline ─ margin_s ─ expiry at the earliest
      │◄──────────────────────────── ttl_s ───────────────────────────────────►│

The leadership shell (``leadership.py``) renews every ``renew_s`` and, while renews fail,
retries until ``deadline``; a leader with no confirmed renew by then stops scheduling, before
any standby can take the key.

A Redis that restarts without its data loses the key while its holder still leads; the holder
re-creates it at its next renew. A standby therefore takes a free key at once only when it is the
same Redis server (its run id) that it last saw holding the lease; after a restart it first waits
until the lease it last saw would have run out (:class:`Sighting`).
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass


@dataclass(frozen=True)
class Holder:
    """Who holds the lease: the key's value, ``<scheduler id>:<pid>:<term nonce>``. The nonce is
    new for every term, so a process that lost the lease and took it again is told apart."""

    scheduler_id: str
    pid: int
    nonce: str

    @classmethod
    def new(cls, scheduler_id: str) -> Holder:
        """A holder for a new term of this process."""
        return cls(scheduler_id, os.getpid(), secrets.token_hex(4))

    @classmethod
    def parse(cls, value: str | bytes | None) -> Holder | None:
        """The holder a key's value names (None: no value, or not one of ours)."""
        if value is None:
            return None
        text = value.decode() if isinstance(value, bytes) else value
        parts = text.rsplit(":", 2)
        if len(parts) != 3 or not parts[1].isdigit():
            return None
        return cls(parts[0], int(parts[1]), parts[2])

    def __str__(self) -> str:
        return f"{self.scheduler_id}:{self.pid}:{self.nonce}"


@dataclass
class LeaseClock:
    """Renew times and the deadline of one holder, on a monotonic clock the caller passes in."""

    ttl_s: float = 3.0  # the lease's time to live in Redis (PX)
    renew_s: float = 0.5  # a leader renews this often; a standby looks at it this often
    margin_s: float = 0.5  # a leader stops acting this long before the lease could expire
    deadline: float | None = None  # act as leader only before this time (None: not leading)
    renew_at: float | None = None  # the next renew is due then

    def __post_init__(self) -> None:
        if min(self.ttl_s, self.renew_s, self.margin_s) <= 0:
            raise ValueError("lease ttl, renew interval and margin must be positive")
        if self.renew_s + self.margin_s >= self.ttl_s:
            raise ValueError(
                f"renew interval {self.renew_s} s + margin {self.margin_s} s must be shorter "
                f"than the lease ttl {self.ttl_s} s (a renew must land before the deadline)"
            )

    @classmethod
    def of(cls, ttl_s: float, renew_s: float) -> LeaseClock:
        """A clock with the default margin: half a second, or half the slack between the renew
        interval and the ttl when that is less."""
        if not 0 < renew_s < ttl_s:
            raise ValueError(f"the lease ttl ({ttl_s} s) must be longer than the renew interval "
                             f"({renew_s} s), and both positive")  # fmt: skip
        return cls(ttl_s, renew_s, margin_s=min(0.5, (ttl_s - renew_s) / 2))

    @property
    def ttl_ms(self) -> int:
        return max(1, round(self.ttl_s * 1000))

    @property
    def retry_s(self) -> float:
        """Between attempts of a renew that failed (Redis unreachable): a few before the deadline."""
        return self.renew_s / 4

    def confirmed(self, sent_at: float) -> None:
        """Redis confirmed a take or renew sent at ``sent_at``: leading until the new deadline."""
        self.deadline = sent_at + self.ttl_s - self.margin_s
        self.renew_at = sent_at + self.renew_s

    def failed(self, now: float) -> None:
        """A renew attempt got no answer: try again soon (the deadline stays)."""
        self.renew_at = now + self.retry_s

    def leads(self, now: float) -> bool:
        """True while the last confirmed lease still covers ``now`` (with the margin)."""
        return self.deadline is not None and now < self.deadline

    def lose(self) -> None:
        """Leading ends (lease taken, deadline passed, or stopping)."""
        self.deadline = self.renew_at = None

    def wake_at(self) -> float | None:
        """When the leader must act next: renew, or stop at the deadline, whichever is first."""
        if self.deadline is None or self.renew_at is None:
            return None
        return min(self.renew_at, self.deadline)


@dataclass
class Sighting:
    """What a standby last saw of a held lease: on which Redis server (its run id), and until when
    that lease could last at most (the time its read returned + the ttl left)."""

    run_id: str | None = None
    until: float = 0.0

    def saw(self, run_id: str, ttl_left_s: float, now: float) -> None:
        """The lease was held, with ``ttl_left_s`` to live, on the server ``run_id``."""
        self.run_id, self.until = run_id, now + max(0.0, ttl_left_s)

    def may_take(self, run_id: str, now: float) -> bool:
        """May a standby take the key it finds free on server ``run_id`` now? Yes, unless the
        server restarted since the lease was seen held and that lease could still run: the
        restart may have lost the key of a holder that still leads (it re-creates it)."""
        return self.run_id is None or run_id == self.run_id or now >= self.until
