"""API keys: configured as sha256 hashes (the key itself is never stored or logged).

``AEGAEON_API_KEYS_FILE`` points at JSON or TOML::

    [[keys]]
    name = "team-a"
    sha256 = "9f86d0…"          # hashlib.sha256(key.encode()).hexdigest()
    rpm = 60                    # requests per minute (optional)
    tpm = 100000                # tokens per minute, prompt + completion (optional)
    models = ["demo-tiny"]      # allowed models (optional; absent: all)
    max_in_flight = 64          # requests in flight at once (optional; AEGAEON_MAX_IN_FLIGHT_PER_KEY)
    admin = true                # may deploy, drain and remove models (optional; default false)

Only ``admin`` keys may call the admin API (``/v1/aegaeon/models``: deploy, drain, remove); they
manage every model (their ``models`` list limits only what they may use and see).

With no file configured, access is open (the embedded development default, the admin API
included), and the gateway refuses to listen on a non-loopback address that way unless told
``--insecure-open``. A file,
once configured, is enforced: one that lists no keys refuses every request, and one that does not
parse or holds a malformed entry stops the gateway at start with the file and entry named.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .limits import Limit


@dataclass(frozen=True)
class ApiKey:
    """One configured key, by name; ``models`` None means every model; ``admin``: may call the
    admin API."""

    name: str
    sha256: str
    limit: Limit = field(default_factory=Limit)
    models: frozenset[str] | None = None
    admin: bool = False

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models


ANONYMOUS = ApiKey(name="anonymous", sha256="", admin=True)
"""The caller when access is open: whoever reaches an open gateway (loopback, or a network the
operator opened with --insecure-open) may do everything, the admin API included."""


def admin_refusal(key: ApiKey) -> str | None:
    """Why ``key`` may not call the admin API (None: it may)."""
    if key.admin:
        return None
    return (
        f"The API key '{key.name}' may not manage models: the admin API needs a key with "
        "'admin = true' in the keys file."
    )


class AuthError(Exception):
    """No key, or a key that matches none configured."""


class KeysFileError(ValueError):
    """The keys file cannot be read, does not parse, or holds a malformed entry."""


def hash_key(key: str) -> str:
    """The sha256 hex digest a key is configured by."""
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    """The configured keys. ``authenticate`` compares digests in constant time. ``enforced``: a
    keys file is configured (then an empty one refuses everyone)."""

    def __init__(self, keys: list[ApiKey], enforced: bool | None = None) -> None:
        self.keys = keys
        self.enforced = bool(keys) if enforced is None else enforced

    @property
    def open_access(self) -> bool:
        return not self.enforced

    @classmethod
    def load(cls, path: str | Path | None) -> KeyStore:
        """Keys from a JSON or TOML file; no path: open access. Raises KeysFileError."""
        if not path:
            return cls([], enforced=False)
        try:
            text = Path(path).read_text()
            data = tomllib.loads(text) if str(path).endswith(".toml") else json.loads(text)
        except (OSError, ValueError) as exc:  # JSON and TOML decode errors are ValueErrors
            raise KeysFileError(f"API keys file {path}: {exc}") from exc
        entries = data.get("keys", []) if isinstance(data, dict) else data
        if not isinstance(entries, list):
            raise KeysFileError(f"API keys file {path}: 'keys' must be a list of tables")
        keys = []
        for i, entry in enumerate(entries):
            try:
                keys.append(_parse_key(entry))
            except (KeyError, TypeError, ValueError) as exc:
                raise KeysFileError(f"API keys file {path}, key #{i + 1}: {exc}") from exc
        return cls(keys, enforced=True)

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


def _parse_key(entry: object) -> ApiKey:
    if not isinstance(entry, dict):
        raise TypeError("an entry must be a table with at least 'sha256'")
    digest = entry["sha256"]
    if (
        not isinstance(digest, str)
        or len(digest) != 64
        or any(c not in "0123456789abcdef" for c in digest.lower())
    ):
        raise ValueError("sha256 must be a string of 64 hex digits")
    name = entry.get("name", digest[:8])
    if not isinstance(name, str) or not name:
        raise TypeError("name must be a non-empty string")
    models = entry.get("models")
    if models is not None and (
        not isinstance(models, list) or not all(isinstance(m, str) for m in models)
    ):
        raise TypeError("models must be a list of model names")
    admin = entry.get("admin", False)
    if not isinstance(admin, bool):
        raise TypeError("admin must be true or false")
    return ApiKey(
        name=name,
        sha256=digest.lower(),
        admin=admin,
        limit=Limit(
            rpm=_positive(entry, "rpm"),
            tpm=_positive(entry, "tpm"),
            max_in_flight=_positive(entry, "max_in_flight"),
        ),
        models=frozenset(models) if models is not None else None,
    )


def _positive(entry: dict, field_name: str) -> int | None:
    value = entry.get(field_name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{field_name} must be a positive integer (or absent: no limit)")
    return value


def is_loopback(host: str) -> bool:
    """Whether a bind address reaches this machine only (``localhost`` counts; ``0.0.0.0``,
    ``::`` and other names do not)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_refusal(host: str, keystore: KeyStore, insecure_open: bool) -> str | None:
    """Why the gateway must not listen on ``host`` as configured, or None when it may."""
    if keystore.enforced or insecure_open or is_loopback(host):
        return None
    return (
        f"refusing to serve on {host} with open access: set AEGAEON_API_KEYS_FILE to a keys "
        "file (see services/gateway/auth.py), or pass --insecure-open to accept anyone who "
        "can reach this address"
    )
