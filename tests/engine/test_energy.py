"""Energy per output token: each turn's GPU energy is charged to its model (the meter's logic;
the NVML counter itself is read only on a CUDA machine, in tools/gpu_check.sh)."""

import pytest
import torch
from aegaeon.gpu_worker.energy import EnergyMeter, energy_meter


def readings(*values: int | None):
    sequence = iter(values)
    return lambda: next(sequence)


def test_each_turn_is_charged_to_its_model_and_divided_by_its_tokens():
    meter = EnergyMeter(readings(1_000, 4_000, 4_500, 8_500, 9_000, 15_000))
    meter.turn_started()
    assert meter.turn_ended("a", 10) == 3.0  # 3,000 mJ over 10 tokens
    meter.turn_started()  # 500 mJ between turns (idle) is charged to nobody
    assert meter.turn_ended("b", 2) == 4.0
    meter.turn_started()
    assert meter.turn_ended("a", 20) == 6.0
    assert meter.models["a"].joules == 9.0 and meter.models["a"].tokens == 30
    assert meter.models["a"].per_token == 0.3
    assert meter.models["b"].per_token == 2.0


def test_a_failed_reading_charges_nothing_and_counts_no_tokens():
    meter = EnergyMeter(readings(None, 2_000, 3_000, None))
    meter.turn_started()
    assert meter.turn_ended("a", 5) is None
    meter.turn_started()
    assert meter.turn_ended("a", 5) is None
    assert "a" not in meter.models  # the ratio stays one of like with like


def test_a_turn_without_tokens_still_costs_energy():
    meter = EnergyMeter(readings(0, 700))
    meter.turn_started()
    assert meter.turn_ended("a", 0) == 0.7
    assert meter.models["a"].per_token is None


def test_no_meter_off_cuda():
    assert energy_meter("cpu") is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_energy_counter_grows_with_work_on_cuda():
    meter = energy_meter("cuda:0")
    assert meter is not None, "NVML has no energy counter for this GPU (pre-Volta or no driver)"
    x = torch.randn(8192, 8192, device="cuda")
    meter.turn_started()
    for _ in range(200):  # ~0.2 PFLOP: long enough for the counter to move (it updates in ms)
        x = torch.tanh(x @ x)
    torch.cuda.synchronize()
    joules = meter.turn_ended("work", 1)
    print(f"energy of 200 fp32 8192² matmuls: {joules} J")
    assert joules is not None and joules > 0
