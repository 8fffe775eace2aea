"""A model's serving settings: what an operator sets for it while the system serves, and the
model-store keeps with its lifecycle state. Pure.

- ``priority``: its class against other models' work (``aegaeon.priority``).
- ``pin``: how many worker instances keep it resident (the aegaeon policy's ``ModelSpec.pin``);
  0, the default, pins it nowhere.
- ``keep_alive_s``: how long it may sit idle (nothing of it queued or running) before the
  scheduler evicts it from every worker's weight slots and every model-store's host cache
  (``services/scheduler/keep_alive.py``); 0, the default, keeps it until another model needs
  the room (and the store's own ``--keep-alive-s``, if set, still applies to its cache).

They are set by the admin API (``SetServing`` on ``models.serving``; priority and pin also in a
deploy's body), the CLI (``aegaeon models priority|pin|keep-alive``, ``deploy``/``add --priority
--pin``) and, without a running store, ``model_store.lifecycle.record_serving``. Each of them
bounds a pin count by MAX_PIN and a keep-alive by MAX_KEEP_ALIVE_S, the gateway in its request
schema, the rest through ``check_pin`` and ``check_keep_alive``.
"""

from __future__ import annotations

import argparse
import contextlib

MAX_PIN = 64
"""The most instances one model may be pinned on: more than a deployment has today, so the bound
only stops a typo (``640``) from reading as "pin it everywhere"."""


MAX_KEEP_ALIVE_S = 30 * 86400.0
"""The longest idle time a keep-alive may name (30 days): longer is "keep it", which 0 says."""


def check_pin(value: object) -> int:
    """``value`` as a pin count (an int from 0 to MAX_PIN), or ValueError saying the range."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_PIN:
        return value
    raise ValueError(
        f"pin must be a whole number of instances from 0 (not pinned) to {MAX_PIN}; got {value!r}"
    )


def pin_argument(text: str) -> int:
    """A command-line word as a pin count (argparse's ``type``), refused with the range."""
    value: object
    try:
        value = int(text)
    except ValueError:
        value = text
    try:
        return check_pin(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def check_keep_alive(value: object) -> float:
    """``value`` as a keep-alive in seconds (0 to MAX_KEEP_ALIVE_S), or ValueError saying so."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
        if 0.0 <= seconds <= MAX_KEEP_ALIVE_S:
            return seconds
    raise ValueError(
        f"keep-alive must be a number of seconds from 0 (keep it until the room is needed) to "
        f"{MAX_KEEP_ALIVE_S:.0f}; got {value!r}"
    )


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def keep_alive_argument(text: str) -> float:
    """A command-line word as a keep-alive (argparse's ``type``): seconds, or a number with the
    unit s, m, h or d (``90``, ``5m``, ``2h``); refused with the range."""
    word = text.strip().lower()
    scale = _UNITS.get(word[-1:]) if word else None
    value: object = text
    with contextlib.suppress(ValueError):  # not a number: refused below, with the range
        value = float(word[:-1]) * scale if scale is not None else float(word)
    try:
        return check_keep_alive(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def keep_alive_text(seconds: float) -> str:
    """A keep-alive in words: ``evicted after 300 s idle``, ``kept until the room is needed``."""
    if seconds == 0:
        return "kept until the room is needed"
    return f"evicted after {seconds:g} s idle"


def pin_text(pin: int) -> str:
    """A pin count in words: ``pinned on 2 instances``, ``unpinned``."""
    if pin == 0:
        return "unpinned"
    return f"pinned on {pin} instance{'' if pin == 1 else 's'}"


def settings_text(
    priority: str | None = None, pin: int | None = None, keep_alive_s: float | None = None
) -> str:
    """The settings given, in words (None: not given): ``high priority, pinned on 2 instances``."""
    words = [f"{priority} priority"] if priority is not None else []
    if pin is not None:
        words.append(pin_text(pin))
    if keep_alive_s is not None:
        words.append(keep_alive_text(keep_alive_s))
    return ", ".join(words)
