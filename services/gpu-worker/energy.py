"""Energy per output token, per model, from the GPU's cumulative energy counter (NVML, where the
GPU has one: Volta and newer).

The worker reads the counter when a turn starts and when it ends, and charges the difference to
the turn's model, its switch included (bringing the model in is that model's cost); time between
turns is charged to nobody. With the output tokens of the same turns this gives joules per output
token per model. The bookkeeping (:class:`EnergyMeter`) is pure: the counter's reader is passed
in; :func:`energy_meter` builds one on NVML where the GPU has the counter. No Prometheus or NATS
here: the engine tests import this on a bare GPU image.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class ModelEnergy:
    """What one model's turns spent on this worker, and what they produced."""

    joules: float = 0.0
    tokens: int = 0

    @property
    def per_token(self) -> float | None:
        return self.joules / self.tokens if self.tokens else None


class EnergyMeter:
    """Charges each turn's energy to its model. ``read_mj`` returns the GPU's energy counter in
    millijoules (monotonic since the driver loaded), or None when the reading failed."""

    def __init__(self, read_mj: Callable[[], int | None]) -> None:
        self._read_mj = read_mj
        self._started_mj: int | None = None
        self.models: dict[str, ModelEnergy] = {}

    def turn_started(self) -> None:
        self._started_mj = self._read_mj()

    def turn_ended(self, model: str, tokens: int) -> float | None:
        """The joules charged to ``model`` for the turn that produced ``tokens``; None when
        either reading failed (nothing is charged, its tokens are not counted either, so the
        per-token figure stays a ratio of like with like)."""
        started, self._started_mj = self._started_mj, None
        ended = self._read_mj()
        if started is None or ended is None:
            return None
        joules = max(0, ended - started) / 1000.0
        spent = self.models.setdefault(model, ModelEnergy())
        spent.joules += joules
        spent.tokens += tokens
        return joules


def energy_meter(device: str) -> EnergyMeter | None:
    """A meter for the CUDA ``device`` (``cuda:1``) when NVML counts its GPU's energy (Volta and
    newer, with an NVIDIA driver), else None. NVML numbers GPUs as CUDA does unless
    ``CUDA_VISIBLE_DEVICES`` reorders them, in which case the count is another GPU's."""
    if not device.startswith("cuda"):
        return None
    reader = gpu_energy_reader(int(device.split()[0].partition(":")[2] or 0))
    return EnergyMeter(reader) if reader is not None else None


def gpu_energy_reader(index: int) -> Callable[[], int | None] | None:
    """A reader of GPU ``index``'s cumulative energy counter in millijoules, or None where NVML
    or the counter is missing."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    except Exception:  # no driver, no such GPU, or not supported: no figure rather than a crash
        return None

    def read_mj() -> int | None:
        with contextlib.suppress(pynvml.NVMLError):
            return int(pynvml.nvmlDeviceGetTotalEnergyConsumption(handle))
        return None  # a GPU in a reset: this turn is not charged

    return read_mj
