"""``aegaeon top`` builds its view from bus messages and the gateway's histograms."""

import time

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from rich.console import Console

from aegaeon.protocol import Heartbeat, SchedulerState
from aegaeon.top import Snapshot, histogram_quantiles, render


def test_histogram_quantiles_interpolate_within_buckets():
    registry = CollectorRegistry()
    hist = Histogram("aegaeon:demo_seconds", "d", ["model_name"], buckets=(0.1, 0.2, 0.4),
                     registry=registry)  # fmt: skip
    for _ in range(50):
        hist.labels("a").observe(0.05)
    for _ in range(50):
        hist.labels("b").observe(0.15)
    q = histogram_quantiles(generate_latest(registry).decode(), "aegaeon:demo_seconds")
    assert abs(q["p50"] - 0.1) < 1e-9
    assert 0.1 < q["p99"] <= 0.2


def test_render_shows_workers_queues_and_switch_rate():
    now = time.time()
    snapshot = Snapshot()
    snapshot.heartbeats["w1"] = Heartbeat("w1", "cpu", "both", now, resident_model="demo-llama",
                                          kv_blocks_total=100, kv_blocks_free=25, num_requests=3)  # fmt: skip
    snapshot.state = SchedulerState(now, "aegaeon", queued={"demo-qwen2": 2}, running={"demo-llama": 3},
                                    alpha=0.75)  # fmt: skip
    snapshot.switch_times.extend([now - 1, now - 2])
    console = Console(width=140, record=True)
    console.print(render(snapshot, now))
    text = console.export_text()
    assert "demo-llama" in text and "75%" in text
    assert "demo-qwen2" in text
    assert "0.20" in text  # 2 switches in the 10 s window
    assert "0.75" in text
