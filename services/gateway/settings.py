"""The gateway's settings, validated once at construction; every one has a working default.

Environment (besides the bus's ``AEGAEON_NATS_URL`` / ``AEGAEON_REDIS_URL`` / ``AEGAEON_PREFIX``):

``AEGAEON_API_KEYS_FILE``      JSON/TOML of hashed keys with limits (auth.py); unset: open access
``AEGAEON_MAX_BODY_BYTES``     larger request bodies get 413 (default 4 MiB)
``AEGAEON_MAX_PROMPT_TOKENS``  longer prompts get 413 (default: only the model's context limits)
``AEGAEON_MAX_IN_FLIGHT``      requests in flight through this gateway before 503 (default 1024)
``AEGAEON_MAX_IN_FLIGHT_PER_KEY``  one API key's share of them (default: a quarter)
``AEGAEON_REQUEST_HEADROOM``   HTTP requests in progress beyond those before every one gets 503 (64)
``AEGAEON_SUBMIT_TIMEOUT_S``   wait for the scheduler's admission answer (default 10 s)
``AEGAEON_SEND_TIMEOUT_S``     a stream write the client does not take ends its request (30 s)
``AEGAEON_IDLE_TIMEOUT_S``     no token for this long ends a request with an error (default 600 s)
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from aegaeon.config import BusConfig, default_state_dir
from aegaeon.subjects import subject_token


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def _env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


@dataclass(frozen=True)
class GatewaySettings:
    """Where the gateway connects, who may use it and how much it accepts."""

    bus: BusConfig = field(default_factory=BusConfig)
    gateway_id: str = field(default_factory=lambda: f"gw-{secrets.token_hex(4)}")
    api_keys_file: str | None = field(
        default_factory=lambda: os.environ.get("AEGAEON_API_KEYS_FILE") or None
    )
    max_body_bytes: int = field(
        default_factory=lambda: _env_int("AEGAEON_MAX_BODY_BYTES", 4 * 1024 * 1024)
    )
    max_prompt_tokens: int | None = field(
        default_factory=lambda: _env_int("AEGAEON_MAX_PROMPT_TOKENS", 0) or None
    )
    max_in_flight: int = field(default_factory=lambda: _env_int("AEGAEON_MAX_IN_FLIGHT", 1024))
    # One key's share of max_in_flight (a key's own max_in_flight in the keys file overrides it):
    # a key holding streams it never reads cannot take every slot. 0: a quarter of the total.
    max_in_flight_per_key: int = field(
        default_factory=lambda: _env_int("AEGAEON_MAX_IN_FLIGHT_PER_KEY", 0)
    )
    # HTTP requests in progress at once beyond max_in_flight (health, metrics, model lists,
    # bodies still being read, refusals); past them every request is answered 503 at once.
    request_headroom: int = field(default_factory=lambda: _env_int("AEGAEON_REQUEST_HEADROOM", 64))
    submit_timeout_s: float = field(
        default_factory=lambda: _env_float("AEGAEON_SUBMIT_TIMEOUT_S", 10.0)
    )
    # A stream write the client does not take for this long (it stopped reading) ends the
    # request: its slot and its tokens go back.
    send_timeout_s: float = field(
        default_factory=lambda: _env_float("AEGAEON_SEND_TIMEOUT_S", 30.0)
    )
    # No token event for this long ends a request with an error (a lost worker and scheduler).
    idle_timeout_s: float = field(
        default_factory=lambda: _env_float("AEGAEON_IDLE_TIMEOUT_S", 600.0)
    )
    models_ttl_s: float = 2.0
    tokenizer_cache_dir: Path = field(default_factory=lambda: default_state_dir() / "tokenizers")

    def __post_init__(self) -> None:
        subject_token(self.gateway_id)  # raises ValueError naming what an id may hold
        if self.max_body_bytes < 1024:
            raise ValueError("max_body_bytes must be at least 1024")
        if self.max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        if self.request_headroom < 0:
            raise ValueError("request_headroom must be 0 or more")
        if self.max_in_flight_per_key < 0:
            raise ValueError("max_in_flight_per_key must be 0 (a quarter of the total) or more")
        if min(self.submit_timeout_s, self.idle_timeout_s, self.send_timeout_s) <= 0:
            raise ValueError("timeouts must be positive")

    @property
    def max_requests(self) -> int:
        """HTTP requests the gateway serves at once (app.py's RequestLimit)."""
        return self.max_in_flight + self.request_headroom

    @property
    def per_key_in_flight(self) -> int:
        """The per-key bound in effect (``max_in_flight_per_key``, 0: a quarter of the total)."""
        return self.max_in_flight_per_key or max(1, self.max_in_flight // 4)
