"""The Grafana dashboard queries only metrics that aegaeon/metrics.py defines, and covers what an
operator needs to see (latency SLOs, queues, switching, KV, host cache, α and quota, GPUs)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from aegaeon.metrics import series_names

GRAFANA = Path(__file__).resolve().parents[2] / "infra" / "grafana"
DASHBOARD = json.loads((GRAFANA / "dashboards" / "aegaeon.json").read_text())
PANELS = DASHBOARD["panels"]
METRIC = re.compile(r"aegaeon:[A-Za-z0-9_:]+")


def expressions() -> list[str]:
    return [t["expr"] for panel in PANELS for t in panel["targets"]]


def referenced() -> set[str]:
    return {name for expr in expressions() for name in METRIC.findall(expr)}


@pytest.mark.parametrize("panel", PANELS, ids=[p["title"] for p in PANELS])
def test_every_panel_queries_only_defined_metrics(panel):
    assert panel["targets"], "a panel without a query"
    defined = series_names()
    for target in panel["targets"]:
        names = METRIC.findall(target["expr"])
        assert names, f"{target['expr']!r} queries no aegaeon metric"
        assert set(names) <= defined, set(names) - defined


def test_histogram_quantiles_read_bucket_series():
    for expr in expressions():
        if "histogram_quantile" in expr:
            assert all(n.endswith("_bucket") for n in METRIC.findall(expr)), expr


def test_the_dashboard_covers_slos_queues_switching_kv_cache_policy_and_gpus():
    wanted = {
        "aegaeon:time_to_first_token_seconds_bucket",
        "aegaeon:time_per_output_token_seconds_bucket",
        "aegaeon:num_requests_running",
        "aegaeon:num_requests_waiting",
        "aegaeon:kv_cache_usage_perc",
        "aegaeon:model_switches_total",
        "aegaeon:model_switch_latency_seconds_bucket",
        "aegaeon:resident_models",
        "aegaeon:host_cache_hits_total",
        "aegaeon:host_cache_misses_total",
        "aegaeon:round_alpha",
        "aegaeon:turn_quota_seconds_bucket",
        "aegaeon:gpu_utilization_perc",
    }
    assert wanted <= referenced(), wanted - referenced()


def test_panels_have_unique_ids_and_use_the_datasource_variable():
    ids = [p["id"] for p in PANELS]
    assert len(ids) == len(set(ids))
    assert any(v["name"] == "datasource" for v in DASHBOARD["templating"]["list"])
    for panel in PANELS:
        assert panel["datasource"]["uid"] == "${datasource}"


def test_provisioning_loads_the_dashboards_folder_from_prometheus():
    provider = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "aegaeon.yaml").read_text()
    )
    assert provider["providers"][0]["type"] == "file"
    source = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text()
    )
    assert source["datasources"][0]["type"] == "prometheus"


def test_compose_prometheus_scrapes_every_service_that_serves_metrics():
    compose = yaml.safe_load((GRAFANA.parents[1] / "docker-compose.yml").read_text())
    config = yaml.safe_load((GRAFANA / "prometheus-compose.yml").read_text())
    targets = {
        t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    }
    for name, spec in compose["services"].items():
        words = [str(w) for w in spec.get("command", [])]
        if "--metrics-port" in words:
            assert f"{name}:{words[words.index('--metrics-port') + 1]}" in targets, name
        elif words[1:3] == ["serve", "gateway"]:
            assert f"{name}:{words[words.index('--port') + 1]}" in targets, name
