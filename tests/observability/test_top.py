"""``aegaeon top`` draws the gateway's runtime view and its latency histograms."""

import time

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from rich.console import Console

from aegaeon.protocol import Heartbeat, ModelInfo, SchedulerState, SwitchDone
from aegaeon.runtime_view import event_record, runtime_document
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
    beat = Heartbeat("w1", "cpu", "both", now, resident_model="demo-llama",
                     kv_blocks_total=100, kv_blocks_free=25, num_requests=3)  # fmt: skip
    state = SchedulerState(now, "aegaeon", queued={"demo-qwen2": 2}, running={"demo-llama": 3},
                           alpha=0.75)  # fmt: skip
    switches = [event_record(SwitchDone("w1", "demo-qwen2", "demo-llama", 0.01, 1 << 20), t)
                for t in (now - 1, now - 2)]  # fmt: skip
    snapshot = Snapshot(runtime_document([beat], state, switches, now))
    console = Console(width=140, record=True)
    console.print(render(snapshot, now))
    text = console.export_text()
    assert "demo-llama" in text and "75%" in text
    assert "demo-qwen2" in text
    assert "0.20" in text  # 2 switches in the 10 s window
    assert "0.75" in text


def test_the_view_says_when_the_gateway_does_not_answer():
    console = Console(width=140, record=True)
    console.print(render(Snapshot(error="connection refused"), time.time()))
    assert "gateway: connection refused" in console.export_text()


def test_the_view_lists_every_registered_model_with_its_state_class_and_pin():
    now = time.time()
    registry = [
        ModelInfo("idle-one", "LlamaForCausalLM", "llama", "/m/a", 1, 1, 64, "float32"),
        ModelInfo("going", "LlamaForCausalLM", "llama", "/m/b", 1, 1, 64, "float32",
                  state="draining", priority="high", pin=2),
    ]  # fmt: skip
    state = SchedulerState(now, "aegaeon", queued={"going": 1})
    document = runtime_document([], state, [], now, registry=registry)
    by_name = {m["model"]: m for m in document["models"]}
    assert (by_name["idle-one"]["state"], by_name["idle-one"]["queued"]) == ("ready", 0)
    assert (by_name["going"]["state"], by_name["going"]["priority"], by_name["going"]["pin"]) == (
        "draining", "high", 2,
    )  # fmt: skip
    console = Console(width=160, record=True)
    console.print(render(Snapshot(document), now))
    text = console.export_text()
    assert "idle-one" in text and "draining" in text and "high" in text
