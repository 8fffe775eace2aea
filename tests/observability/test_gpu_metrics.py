"""NVML sampling fills the GPU gauges (NVML itself replaced by a stand-in: no GPU in CI), and does
nothing at all on a machine without an NVIDIA driver."""

from __future__ import annotations

import sys
import types

import pytest

from aegaeon import metrics


class _NVMLError(Exception):
    pass


def fake_pynvml(utilization: int, used: int, fail: bool = False) -> types.ModuleType:
    module = types.ModuleType("pynvml")
    module.NVMLError = _NVMLError  # type: ignore[attr-defined]

    def init() -> None:
        if fail:
            raise _NVMLError("NVML Shared Library Not Found")

    module.nvmlInit = init  # type: ignore[attr-defined]
    module.nvmlDeviceGetCount = lambda: 2  # type: ignore[attr-defined]
    module.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    module.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=utilization + h)  # type: ignore[attr-defined]
    module.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=used * (h + 1))  # type: ignore[attr-defined]
    return module


@pytest.fixture
def nvml(monkeypatch):
    def install(module: types.ModuleType) -> None:
        monkeypatch.setitem(sys.modules, "pynvml", module)
        monkeypatch.setattr(metrics, "_nvml_state", {})

    return install


def test_sampling_sets_utilization_and_memory_of_the_asked_gpu(nvml):
    nvml(fake_pynvml(utilization=40, used=1000))
    metrics.sample_gpus([1])
    assert metrics.GPU_UTILIZATION.labels("1")._value.get() == 41
    assert metrics.GPU_MEMORY_USED.labels("1")._value.get() == 2000


def test_sampling_every_gpu_by_default(nvml):
    nvml(fake_pynvml(utilization=7, used=5))
    metrics.sample_gpus()
    assert metrics.GPU_UTILIZATION.labels("0")._value.get() == 7
    assert metrics.GPU_MEMORY_USED.labels("1")._value.get() == 10


def test_without_a_driver_sampling_does_nothing(nvml):
    nvml(fake_pynvml(utilization=99, used=99, fail=True))
    metrics.sample_gpus([5])
    assert ("5",) not in metrics.GPU_UTILIZATION._metrics
