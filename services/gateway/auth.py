"""API keys: configured as sha256 hashes (the key itself is never stored or logged).

``AEGAEON_API_KEYS_FILE`` points at JSON or TOML::

    [[keys]]
    name = "team-a"
    sha256 = "9f86d0…"          # hashlib.sha256(key.encode()).hexdigest()
    rpm = 60                    # requests per minute (optional)
    tpm = 100000                # tokens per minute, prompt + completion (optional)
    models = ["demo-tiny"]      # allowed models (optional; absent: all)

With no file, access is open (the embedded development default).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .limits import Limit


@dataclass(frozen=True)
class ApiKey:
    """One configured key, by name; ``models`` None means every model."""

    name: str
    sha256: str
    limit: Limit = field(default_factory=Limit)
    models: frozenset[str] | None = None

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models


ANONYMOUS = ApiKey(name="anonymous", sha256="")
"""The caller when access is open."""


class AuthError(Exception):
    """No key, or a key that matches none configured."""


def hash_key(key: str) -> str:
    """The sha256 hex digest a key is configured by."""
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    """The configured keys. ``authenticate`` compares digests in constant time."""

    def __init__(self, keys: list[ApiKey]) -> None:
        self.keys = keys

    @property
    def open_access(self) -> bool:
        return not self.keys

    @classmethod
    def load(cls, path: str | Path | None) -> KeyStore:
        """Keys from a JSON or TOML file; no path: open access."""
        if not path:
            return cls([])
        text = Path(path).read_text()
        data = tomllib.loads(text) if str(path).endswith(".toml") else json.loads(text)
        entries = data.get("keys", []) if isinstance(data, dict) else data
        return cls([_parse_key(entry) for entry in entries])

    def authenticate(self, authorization: str | None) -> ApiKey:
        """The key behind an ``Authorization: Bearer …`` header. Raises AuthError."""
        if self.open_access:
            return ANONYMOUS
        token = _bearer(authorization)
        if token is None:
            raise AuthError("Missing API key: send 'Authorization: Bearer <key>'.")
        digest = hash_key(token)
        found = None
        for key in self.keys:  # no early exit: the time taken does not depend on which matched
            if hmac.compare_digest(digest, key.sha256):
                found = key
        if found is None:
            raise AuthError("Incorrect API key provided.")
        return found


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def _parse_key(entry: dict) -> ApiKey:
    digest = str(entry["sha256"]).lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f"key {entry.get('name')!r}: sha256 must be 64 hex digits")
    models = entry.get("models")
    return ApiKey(
        name=str(entry.get("name", digest[:8])),
        sha256=digest,
        limit=Limit(rpm=entry.get("rpm"), tpm=entry.get("tpm")),
        models=frozenset(models) if models is not None else None,
    )
