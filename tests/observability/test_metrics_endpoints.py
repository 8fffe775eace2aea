"""Every service serves Prometheus /metrics; after one request each shows its series, labelled
with the model where the meaning is per model."""

from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import ObservedStack, stream_chat

pytestmark = pytest.mark.slow

MODEL = "demo-llama"


PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
"""What Prometheus 2.x sends when it scrapes: an endpoint that answers OpenMetrics with escaped
names would have its ``aegaeon:`` series stored under other names."""


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """series name → [(labels, value)], scraped as Prometheus scrapes."""
    series: dict[str, list[tuple[dict[str, str], float]]] = {}
    reply = httpx.get(url, timeout=5, headers={"Accept": PROMETHEUS_ACCEPT})
    for family in text_string_to_metric_families(reply.text):
        for sample in family.samples:
            series.setdefault(sample.name, []).append((sample.labels, sample.value))
    return series


def value(series: dict, name: str, **labels: str) -> float:
    """The sum over samples of ``name`` whose labels include ``labels`` (0 when none)."""
    return sum(v for got, v in series.get(name, []) if labels.items() <= got.items())


def has(series: dict, name: str, **labels: str) -> bool:
    """Some sample of ``name`` carries ``labels``."""
    return any(labels.items() <= got.items() for got, _ in series.get(name, []))


def scrape_until(url: str, ready, timeout: float = 60.0) -> dict:
    """Scrape until ``ready(series)`` (gauges are refreshed about once a second)."""
    deadline = time.monotonic() + timeout
    series = scrape(url)
    while not ready(series) and time.monotonic() < deadline:
        time.sleep(0.25)
        series = scrape(url)
    return series


@pytest.fixture(scope="module")
def served(observed: ObservedStack) -> ObservedStack:
    lines = stream_chat(observed.stack.url, MODEL, 5, {})
    assert lines[-1] == "[DONE]"
    return observed


def test_launcher_lists_a_metrics_endpoint_for_every_service(served):
    assert set(served.metrics_urls) == {"gateway", "scheduler", "model-store", "worker-0"}


def test_gateway_metrics_show_the_client_side_latencies_of_the_model(served):
    s = scrape(served.metrics_urls["gateway"])
    for name in (
        "aegaeon:time_to_first_token_seconds_count",
        "aegaeon:time_per_output_token_seconds_count",
        "aegaeon:e2e_request_latency_seconds_count",
        "aegaeon:inter_token_latency_seconds_count",
    ):
        assert value(s, name, model_name=MODEL) >= 1, name
    assert (
        value(s, "aegaeon:request_success_total", model_name=MODEL, finished_reason="length") >= 1
    )
    assert value(s, "aegaeon:generation_tokens_total", model_name=MODEL) >= 5
    assert value(s, "aegaeon:prompt_tokens_total", model_name=MODEL) > 0


def test_gateway_counts_refused_requests_by_status(served):
    before = value(
        scrape(served.metrics_urls["gateway"]), "aegaeon:request_errors_total", status="404"
    )
    body = {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(f"{served.stack.url}/v1/chat/completions", json=body).status_code == 404
    after = value(
        scrape(served.metrics_urls["gateway"]), "aegaeon:request_errors_total", status="404"
    )
    assert after == before + 1


def test_scheduler_metrics_show_queues_quotas_and_queue_time_per_model(served):
    s = scrape_until(
        served.metrics_urls["scheduler"],
        lambda s: has(s, "aegaeon:num_requests_waiting", model_name=MODEL),
    )
    assert has(s, "aegaeon:num_requests_waiting", model_name=MODEL)
    assert has(s, "aegaeon:num_requests_running", model_name=MODEL)
    assert value(s, "aegaeon:turn_quota_seconds_count", model_name=MODEL) >= 1
    assert value(s, "aegaeon:turns_dispatched_total", model_name=MODEL) >= 1
    assert value(s, "aegaeon:request_queue_time_seconds_count", model_name=MODEL) >= 1


def test_worker_metrics_show_switches_steps_kv_use_and_the_resident_model(served):
    url = served.metrics_urls["worker-0"]
    # The resident gauge is sampled with each heartbeat: wait for the one after the switch.
    s = scrape_until(url, lambda s: value(s, "aegaeon:resident_models", model_name=MODEL) == 1)
    assert value(s, "aegaeon:engine_step_seconds_count", model_name=MODEL) >= 5
    assert value(s, "aegaeon:model_switches_total", model_name=MODEL) >= 1
    assert value(s, "aegaeon:model_switch_latency_seconds_count", model_name=MODEL) >= 1
    assert has(s, "aegaeon:kv_cache_usage_perc", worker="worker-0")
    resident = {got["model_name"]: v for got, v in s["aegaeon:resident_models"]}
    assert MODEL in resident and sum(resident.values()) == 1  # one model resident at a time


def test_model_store_metrics_show_cache_loads_per_model(served):
    s = scrape(served.metrics_urls["model-store"])
    assert value(s, "aegaeon:host_cache_ensure_seconds_count", model_name=MODEL) >= 1
    assert value(s, "aegaeon:host_cache_misses_total") >= 1
    assert value(s, "aegaeon:host_cache_bytes") > 0
    assert value(s, "aegaeon:registered_models") >= 1
