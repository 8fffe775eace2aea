"""Per-key rate limits and gateway admission (pure: the caller passes the clock).

Rate limits are token buckets refilled continuously, one for requests per minute and one for
tokens per minute, so a key may burst up to its minute's allowance and then flows at the rate.
Tokens are charged up front (prompt + max_tokens, the most a request can cost) and the unused part
is refunded when it finishes, so a burst of long requests cannot overshoot the limit.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenBucket:
    """``capacity`` units, refilled at ``capacity`` per ``period_s``."""

    capacity: float
    period_s: float = 60.0
    level: float = field(default=-1.0)
    updated: float = 0.0

    def __post_init__(self) -> None:
        if self.level < 0:
            self.level = self.capacity

    def _refill(self, now: float) -> None:
        rate = self.capacity / self.period_s
        self.level = min(self.capacity, self.level + (now - self.updated) * rate)
        self.updated = now

    def wait_time(self, amount: float, now: float) -> float:
        """Seconds until ``amount`` could be taken (0: now). More than ``capacity`` counts as
        ``capacity``: such a request passes when the bucket is full rather than never."""
        self._refill(now)
        missing = min(amount, self.capacity) - self.level
        return 0.0 if missing <= 0 else missing * self.period_s / self.capacity

    def take(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level -= amount

    def give_back(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level = min(self.capacity, self.level + amount)


@dataclass(frozen=True)
class Limit:
    """A key's allowance. None: unlimited."""

    rpm: int | None = None
    tpm: int | None = None
    max_in_flight: int | None = None  # None: the gateway's per-key default


class RateLimiter:
    """Buckets per key id. ``acquire`` returns None when admitted, else seconds to wait."""

    def __init__(self) -> None:
        self._requests: dict[str, TokenBucket] = {}
        self._tokens: dict[str, TokenBucket] = {}

    def acquire(self, key: str, limit: Limit, tokens: int, now: float) -> float | None:
        """Charge one request and ``tokens``; nothing is charged when refused."""
        buckets = self._buckets(key, limit, tokens, now)
        waits = [bucket.wait_time(amount, now) for bucket, amount in buckets]
        if any(wait > 0 for wait in waits):
            return max(waits)
        for bucket, amount in buckets:
            bucket.take(amount, now)
        return None

    def acquire_request(self, key: str, limit: Limit, now: float) -> float | None:
        """The request alone (rpm): charged before the prompt costs tokenization."""
        return self.acquire(key, Limit(rpm=limit.rpm), 0, now)

    def acquire_tokens(self, key: str, limit: Limit, tokens: int, now: float) -> float | None:
        """The tokens alone (tpm), once the prompt's length is known."""
        return self.acquire(key, Limit(tpm=limit.tpm), tokens, now)

    def refund(self, key: str, tokens: int, now: float) -> None:
        """Return tokens charged but not used (a request that finished early)."""
        bucket = self._tokens.get(key)
        if bucket is not None and tokens > 0:
            bucket.give_back(tokens, now)

    def _buckets(
        self, key: str, limit: Limit, tokens: int, now: float
    ) -> list[tuple[TokenBucket, int]]:
        buckets: list[tuple[TokenBucket, int]] = []
        if limit.rpm is not None:
            bucket = self._requests.setdefault(key, TokenBucket(limit.rpm, updated=now))
            buckets.append((bucket, 1))
        if limit.tpm is not None:
            bucket = self._tokens.setdefault(key, TokenBucket(limit.tpm, updated=now))
            buckets.append((bucket, tokens))
        return buckets


OVERLOADED = "The server is overloaded; try again."
"""The 503 message when the gateway is full (admission, or the HTTP request limit)."""


class Admission:
    """Bounds on requests in flight through this gateway (queued at the scheduler or streaming):
    in all, and per API key, so one key holding streams it never reads cannot take every slot.

    Past a bound a request is refused with 503 and Retry-After rather than queued without limit:
    an overloaded system should shed load early, before it costs tokenization and Redis writes.
    ``key`` None (open access, every caller the same anonymous key) has only the total bound.
    """

    def __init__(
        self, max_in_flight: int, per_key: int | None = None, retry_after_s: float = 1.0
    ) -> None:
        if max_in_flight < 1 or (per_key is not None and per_key < 1):
            raise ValueError("in-flight bounds must be at least 1")
        self.max_in_flight = max_in_flight
        self.per_key = per_key
        self.retry_after_s = retry_after_s
        self.in_flight = 0
        self.by_key: dict[str, int] = {}

    def refusal(
        self, key: str | None = None, key_cap: int | None = None, count: int = 1
    ) -> str | None:
        """Why ``count`` requests of ``key`` (the choices of one completion) cannot be
        admitted now, or None."""
        if self.in_flight + count > self.max_in_flight:
            return OVERLOADED
        cap = self.key_cap(key, key_cap)
        if cap is not None and self.by_key.get(key or "", 0) + count > cap:
            return f"Too many requests in flight for key '{key}' (at most {cap}); try again."
        return None

    def key_cap(self, key: str | None, key_cap: int | None = None) -> int | None:
        """The bound on ``key``'s requests in flight (None: only the total bounds them)."""
        if key is None:
            return None
        return key_cap if key_cap is not None else self.per_key

    def can_admit(self, key: str | None = None, key_cap: int | None = None) -> bool:
        return self.refusal(key, key_cap) is None

    def admit(self, key: str | None = None) -> None:
        self.in_flight += 1
        if key is not None:
            self.by_key[key] = self.by_key.get(key, 0) + 1

    def release(self, key: str | None = None) -> None:
        self.in_flight = max(0, self.in_flight - 1)
        if key is not None and key in self.by_key:
            self.by_key[key] -= 1
            if self.by_key[key] <= 0:
                del self.by_key[key]  # the table holds only keys with requests in flight
