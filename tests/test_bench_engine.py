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
