"""When to restart a crashed service: exponential backoff, forgiven after a stable run (pure).

``aegaeon up`` asks this class what to do; it holds no processes and does no I/O, so its
decisions are tested with a hand-driven clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Backoff:
    """Delay before restart number k (k = 1, 2, …): ``initial · factor^(k-1)``, at most
    ``maximum``. A service that ran ``stable_after`` seconds before exiting starts over at k = 1."""

    initial: float = 0.5
    factor: float = 2.0
    maximum: float = 30.0
    stable_after: float = 60.0

    def __post_init__(self) -> None:
        if self.initial <= 0 or self.factor < 1 or self.maximum < self.initial:
            raise ValueError(f"bad backoff {self}")

    def delay(self, failures: int) -> float:
        return min(self.maximum, self.initial * self.factor ** max(0, failures - 1))


@dataclass
class RestartPlanner:
    """Tracks each service's start times and failures; says which services are due to restart."""

    backoff: Backoff = field(default_factory=Backoff)
    failures: dict[str, int] = field(default_factory=dict)
    started_at: dict[str, float] = field(default_factory=dict)
    restart_at: dict[str, float] = field(default_factory=dict)

    def started(self, name: str, now: float) -> None:
        """``name`` was (re)started at ``now``."""
        self.started_at[name] = now
        self.restart_at.pop(name, None)

    def exited(self, name: str, now: float) -> float:
        """``name`` exited unexpectedly at ``now``. Returns the delay before its restart."""
        ran_for = now - self.started_at.get(name, now)
        if ran_for >= self.backoff.stable_after:
            self.failures[name] = 0  # it had recovered: a new crash is a fresh incident
        self.failures[name] = self.failures.get(name, 0) + 1
        delay = self.backoff.delay(self.failures[name])
        self.restart_at[name] = now + delay
        return delay

    def due(self, now: float) -> list[str]:
        """Services whose backoff has elapsed, in the order they became due."""
        ready = sorted((at, name) for name, at in self.restart_at.items() if at <= now)
        return [name for _, name in ready]

    def waiting(self, name: str) -> bool:
        """True while ``name`` is down and waiting out its backoff."""
        return name in self.restart_at
