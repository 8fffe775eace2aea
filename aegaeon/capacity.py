"""Whether a model fits the workers, as their heartbeats tell it: one definition of the check and
of the message, used where a model is registered (``aegaeon models add``) and where a request is
admitted (the scheduler)."""

from __future__ import annotations

from aegaeon.protocol import Heartbeat

GIB = 1 << 30


def largest_slot(beat: Heartbeat) -> int:
    """The largest model a worker can hold: one weight slot (its whole weight budget when an
    older worker does not say)."""
    return beat.slot_bytes or beat.weight_budget_bytes


def too_large(model: str, weight_bytes: int, slot_bytes: int) -> str:
    """Why no worker can serve ``model``, and what would change that."""
    return (
        f"model {model!r} has {weight_bytes / GIB:.2f} GiB of weights; the largest weight slot "
        f"of the running workers holds {slot_bytes / GIB:.2f} GiB. Restart the workers so they "
        "size their slots for it (`aegaeon up` sizes them from the registered models), give "
        "them a larger --arena-bytes, or serve it on a device with more memory"
    )
