"""``aegaeon bench engine``: the reload figures beside the switch (fresh process and warm)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def test_reload_figures_give_the_fresh_process_and_the_in_process_reload_beside_the_switch(
    demo_models_dir: Path,
) -> None:
    from aegaeon.gpu_worker.bench import reload_figures

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        figures = reload_figures(demo_models_dir / "demo-llama", "cpu", "float32", switch_s=0.5)
    finally:
        torch.set_num_threads(threads)
    assert set(figures) == {"naive_reload_s", "naive_over_switch", "inprocess_reload_s",
                            "inprocess_reload_over_switch"}  # fmt: skip
    assert figures["naive_reload_s"] > 0 and figures["inprocess_reload_s"] > 0
    assert figures["naive_over_switch"] == pytest.approx(figures["naive_reload_s"] / 0.5)
    assert figures["inprocess_reload_over_switch"] == pytest.approx(
        figures["inprocess_reload_s"] / 0.5
    )


def test_the_roofline_is_the_slower_of_reading_the_bytes_and_doing_the_flops() -> None:
    from aegaeon.gpu_worker.bench import BATCHES, roofline_fractions

    # 1 GB of weights at 10 GB/s: 0.1 s per step whatever the batch, until the FLOPs (2 × 250M
    # per request at 100 GFLOP/s = 5 ms each) take longer: at batch 32, 0.16 s.
    measured = {f"decode_tok_s_b{b}": 9.0 * b for b in BATCHES} | {"weight_bytes": 10**9}
    fractions = roofline_fractions(measured, 10e9, 100e9, 250_000_000, kv_per_token=0)
    assert fractions["roofline_fraction_b1"] == pytest.approx(0.9)
    assert fractions["roofline_fraction_b8"] == pytest.approx(0.9)
    assert fractions["roofline_fraction_b32"] == pytest.approx(9.0 * 0.16)


def test_the_switch_and_the_plain_copy_are_measured_in_turns_and_every_switch_copies(
    demo_models_dir: Path,
) -> None:
    from aegaeon.gpu_worker.bench import _bench_config, measure_switch
    from aegaeon.gpu_worker.engine import Engine

    model_dir = demo_models_dir / "demo-llama"
    engine = Engine(_bench_config("cpu", model_dir))
    copied: list[int] = []
    switch_to = engine.switch_to

    def recording_switch(name: str):
        result = switch_to(name)
        copied.append(result.bytes)
        return result

    try:
        engine.register_model("demo-llama", model_dir)
        engine.switch_to = recording_switch  # type: ignore[method-assign]
        figures = measure_switch(engine, "demo-llama", pairs=4)
    finally:
        engine.close()
    # the warm-up, then 4 measured switches (each after a plain copy clobbered the slot)
    assert copied[1:5] == [figures["weight_bytes"]] * 4
    assert figures["switch_s"] > 0 and figures["memcpy_s"] > 0
    assert figures["switch_over_memcpy"] == pytest.approx(figures["switch_s"] / figures["memcpy_s"])
