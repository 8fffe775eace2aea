"""A model's serving settings: what an operator sets for it while the system serves, and the
model-store keeps with its lifecycle state. Pure.

- ``priority``: its class against other models' work (``aegaeon.priority``).
- ``pin``: how many worker instances keep it resident (the aegaeon policy's ``ModelSpec.pin``);
  0, the default, pins it nowhere.

Both are set by the admin API (``SetServing`` on ``models.serving``, a deploy's body), the CLI
(``aegaeon models priority|pin``, ``deploy``/``add --priority --pin``) and, without a running
store, ``model_store.lifecycle.record_serving``. Each of them bounds a pin count by MAX_PIN, the
gateway in its request schema, the rest through ``check_pin``.
"""

from __future__ import annotations

import argparse

MAX_PIN = 64
"""The most instances one model may be pinned on: more than a deployment has today, so the bound
only stops a typo (``640``) from reading as "pin it everywhere"."""


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


def pin_text(pin: int) -> str:
    """A pin count in words: ``pinned on 2 instances``, ``unpinned``."""
    if pin == 0:
        return "unpinned"
    return f"pinned on {pin} instance{'' if pin == 1 else 's'}"


def settings_text(priority: str | None = None, pin: int | None = None) -> str:
    """The settings given, in words (None: not given): ``high priority, pinned on 2 instances``."""
    words = [f"{priority} priority"] if priority is not None else []
    if pin is not None:
        words.append(pin_text(pin))
    return ", ".join(words)
