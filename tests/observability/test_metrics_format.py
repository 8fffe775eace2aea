"""A service's /metrics keeps the names aegaeon/metrics.py defines when Prometheus scrapes it:
Prometheus 2.x asks for OpenMetrics first, and prometheus_client's own server would answer
with ``aegaeon:`` escaped to ``aegaeon_`` (the dashboard's queries would find nothing)."""

from __future__ import annotations

import socket

import httpx
from prometheus_client.parser import text_string_to_metric_families

from aegaeon import metrics

from .test_metrics_endpoints import PROMETHEUS_ACCEPT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_prometheus_scrape_gets_every_series_under_its_defined_name():
    metrics.MODEL_SWITCHES.labels("m").inc()
    port = free_port()
    server = metrics.serve_metrics(port)
    assert server is not None
    try:
        reply = httpx.get(f"http://127.0.0.1:{port}/metrics", headers={"Accept": PROMETHEUS_ACCEPT})
    finally:
        server.shutdown()
        server.server_close()
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    names = {s.name for f in text_string_to_metric_families(reply.text) for s in f.samples}
    ours = {n for n in names if n.startswith("aegaeon")}
    assert "aegaeon:model_switches_total" in ours
    assert ours <= metrics.series_names(), ours - metrics.series_names()
