"""A registered model's lifecycle: its states, the moves between them, and what a request for a
model in each state is told. One definition, used by the model-store (which owns the state), the
gateway (its admin API, and refusing requests early) and the scheduler (admission). Pure: no I/O.

::

     deploy            cached              drain                 remove
    ───────► loading ─────────► ready ───────────► draining ─────────────► (absent)
                │ load failed                                     ▲
                └───────────► failed ─────────────────────────────┘ remove

A model found in the models directory is ``ready``. Only a ``ready`` model takes requests. The
others refuse them with a status a client can act on: ``loading`` 503 with Retry-After (it is
ready in a moment: retry), ``draining`` and ``failed`` 409 Conflict (the model's state conflicts
with a new request, and retrying will not change it; the gateway also tells OpenAI clients not
to retry).
"""

from __future__ import annotations

import re
from typing import Literal, NamedTuple

from aegaeon.protocol import ModelState

Action = Literal["deploy", "cached", "fail", "drain", "remove"]
"""``deploy``: the admin API registered it; ``cached``: its load into the host cache finished;
``fail``: that load failed; ``drain``: stop taking requests; ``remove``: take it out."""

MOVES: dict[Action, tuple[frozenset[ModelState | None], ModelState | None]] = {
    "deploy": (frozenset({None}), "loading"),
    "cached": (frozenset({"loading"}), "ready"),
    "fail": (frozenset({"loading"}), "failed"),
    "drain": (frozenset({"ready", "draining"}), "draining"),  # draining twice is harmless
    "remove": (frozenset({"draining", "failed"}), None),
}
"""action → (the states it may start from, the state it leads to); None is absent."""

LOADING_RETRY_AFTER_S = 1.0


class LifecycleError(Exception):
    """A move the model's state does not allow: the HTTP status to answer and why, in words."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def next_state(name: str, current: ModelState | None, action: Action) -> ModelState | None:
    """The state ``action`` leads model ``name`` to from ``current`` (None: absent), or a
    LifecycleError saying why it may not."""
    allowed, target = MOVES[action]
    if current in allowed:
        return target
    if current is None:
        raise LifecycleError(404, f"The model '{name}' is not registered.")
    raise LifecycleError(409, _why_not(name, current, action))


def _why_not(name: str, current: ModelState, action: Action) -> str:
    drain = f"`aegaeon models drain {name}` (POST /v1/aegaeon/models/{name}/drain)"
    if action == "deploy":
        return f"A model named '{name}' is already registered ({current}); pick another name."
    if current == "loading":
        return f"The model '{name}' is still loading; wait until it is ready (or failed)."
    if action == "drain" and current == "failed":
        return f"The model '{name}' failed to load; remove it instead of draining it."
    if action == "remove" and current == "ready":
        return (
            f"The model '{name}' is ready and takes requests: drain it first with {drain}, "
            "then remove it once its requests have finished."
        )
    return f"The model '{name}' is {current}, not loading."  # cached / fail: a load ended late


class Refusal(NamedTuple):
    """What a request for a model that does not take requests gets: HTTP status, OpenAI error
    code, message, and seconds after which a retry may succeed (None: it will not)."""

    status: int
    code: str
    message: str
    retry_after: float | None


def serving_refusal(name: str, state: ModelState, reason: str = "") -> Refusal | None:
    """None when a model in ``state`` takes new requests, else how to refuse one."""
    if state == "ready":
        return None
    if state == "loading":
        message = f"The model '{name}' is loading (being validated and cached); retry shortly."
        return Refusal(503, "model_loading", message, LOADING_RETRY_AFTER_S)
    if state == "draining":
        message = (
            f"The model '{name}' is draining: it takes no new requests (those already "
            "accepted finish) and is about to be removed."
        )
        return Refusal(409, "model_draining", message, None)
    message = f"The model '{name}' failed to load: {client_reason(reason) or 'no reason given'}."
    return Refusal(409, "model_failed", message, None)


_ABSOLUTE_PATH = re.compile(r"(?<![\w:/.~-])/(?!dev/shm(?![\w/]))(?:[^\s/:'\"]+/)+([^\s/:'\"]+)")
"""An absolute path (not a URL's, not ``/dev/shm`` itself: advice, not a place); its name."""


def client_reason(reason: str) -> str:
    """A failure reason as API clients see it: each absolute path shortened to its file name
    (a load fails with the node's shared-memory or models-directory paths in its words; the
    model-store's log and the admin CLI keep them whole)."""
    return _ABSOLUTE_PATH.sub(r"\1", reason)
