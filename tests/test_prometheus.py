"""A real Prometheus scrapes ``aegaeon up`` as ``infra/grafana/prometheus-local.yml`` configures
it (file SD on the targets the launcher writes); after traffic that makes the one worker switch
models and swap KV, every query of every Grafana dashboard returns a series, and every series is
stored under the ``aegaeon:`` name the dashboards ask for.

Prometheus is Debian's package, installed by ``make install-test``
(``tools/install-prometheus.sh``); where it could not be, the module skips with the reason."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from aegaeon.bench.stack_process import StackProcess
from aegaeon.metrics import series_names
from aegaeon.servers import free_port

pytestmark = pytest.mark.slow

GRAFANA = Path(__file__).resolve().parents[1] / "infra" / "grafana"
MODELS = ("demo-llama", "demo-qwen2")

GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "5s", "$__range": "5m"}
"""Values for the variables Grafana fills in: the rate window spans the whole test's traffic."""

_NVML = "NVML is read by CUDA workers only; the test's worker runs on the CPU"
GPU_ONLY = {"GPU utilization (NVML)": _NVML, "GPU memory used (NVML)": _NVML,
            "Energy per output token (NVML)": _NVML}  # fmt: skip
"""Panels (by title) whose queries may return nothing here, and why."""


def _why_no_prometheus() -> str:
    note = Path(sys.prefix) / "prometheus-unavailable.txt"  # written by make install-test
    if note.is_file():
        return note.read_text().strip()
    return "prometheus is not on PATH (`make install-test` installs it)"


PROMETHEUS = shutil.which("prometheus")
if PROMETHEUS is None:
    pytest.skip(
        f"Debian's prometheus package could not be installed: {_why_no_prometheus()}",
        allow_module_level=True,
    )


@dataclass
class DashboardQuery:
    """One target of one panel, with Grafana's variables filled in."""

    dashboard: str
    panel: str
    expr: str


def dashboard_queries() -> list[DashboardQuery]:
    queries = []
    for path in sorted((GRAFANA / "dashboards").glob("*.json")):
        dashboard = json.loads(path.read_text())
        for panel in _panels(dashboard["panels"]):
            for target in panel.get("targets", []):
                expr = target["expr"]
                for variable, value in GRAFANA_VARIABLES.items():
                    expr = expr.replace(variable, value)
                queries.append(DashboardQuery(path.name, panel["title"], expr))
    return queries


def _panels(panels: list[dict]) -> Iterator[dict]:
    """Every panel, including those inside rows."""
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


class Prometheus:
    """A Prometheus server run by the test, and the queries of its HTTP API."""

    def __init__(self, binary: str, config: dict, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        config_file = workdir / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config))
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log = workdir / "prometheus.log"
        argv = [
            binary,
            f"--config.file={config_file}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 30.0) -> None:
        wait_until(
            lambda: self.process.poll() is None and self._ready(),
            timeout,
            lambda: f"Prometheus not ready (exit {self.process.poll()}); see {self.log}",
        )

    def _ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The result of an instant query (the series it returns)."""
        return self._get("/api/v1/query", {"query": expr})["result"]

    def metric_names(self) -> list[str]:
        return self._get("/api/v1/label/__name__/values", {})

    def targets(self) -> list[dict[str, Any]]:
        return self._get("/api/v1/targets", {"state": "active"})["activeTargets"]

    def _get(self, path: str, params: dict[str, str]) -> Any:
        reply = httpx.get(f"{self.url}{path}", params=params, timeout=10)
        body = reply.json()
        assert body["status"] == "success", (path, params, body)
        return body["data"]

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (Prometheus closes its storage), SIGKILL if it does not end in time."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def wait_until(ready: Callable[[], bool], timeout: float, why: Callable[[], str]) -> None:
    """Poll ``ready`` every 0.25 s; TimeoutError with ``why()`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(why())
        time.sleep(0.25)


def still_empty(
    prometheus: Prometheus, queries: list[DashboardQuery], timeout: float
) -> list[DashboardQuery]:
    """The queries that return no series once all do or ``timeout`` s have passed (the scrapes
    after the traffic, and a second sample for each rate, take a few seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        empty = [q for q in queries if not prometheus.query(q.expr)]
        if not empty or time.monotonic() > deadline:
            return empty
        time.sleep(0.5)


def local_scrape_config(targets_file: Path) -> dict:
    """``prometheus-local.yml`` as shipped, reading the stack's targets file and scraping every
    second (so the test need not wait 5 s per scrape)."""
    config = yaml.safe_load((GRAFANA / "prometheus-local.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    for job in config["scrape_configs"]:
        for sd in job["file_sd_configs"]:
            sd["files"] = [str(targets_file)]
            sd["refresh_interval"] = "1s"
    return config


def stream_chat(base_url: str, model: str, max_tokens: int, on_token: Callable[[], None]) -> None:
    """One streamed chat completion of exactly ``max_tokens`` tokens through the OpenAI API;
    ``on_token`` is called as each token arrives."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Say something about the sea."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream(
        "POST", f"{base_url}/v1/chat/completions", json=body, timeout=120
    ) as response:
        assert response.status_code == 200, response.read()
        last = ""
        for line in response.iter_lines():
            if line.startswith("data: "):
                if last:  # the role chunk came first: this one and each after carry a token
                    on_token()
                last = line
    assert last == "data: [DONE]"


@pytest.fixture(scope="module")
def stack(tmp_path_factory, demo_models_dir, nats_server, redis_server) -> Iterator[StackProcess]:
    env = {
        "AEGAEON_NATS_URL": nats_server.url,
        "AEGAEON_REDIS_URL": redis_server.url,
        "AEGAEON_PREFIX": "prom",
    }
    # A tight SLO keeps decode turns short, so two models' requests take turns on the worker.
    slo = ["--slo-ttft", "1.0", "--slo-tbt", "0.02"]
    home = tmp_path_factory.mktemp("prom-home")
    with StackProcess(home, models_dir=demo_models_dir, env=env, extra_args=slo) as stack:
        yield stack


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory, stack: StackProcess) -> Iterator[Prometheus]:
    """Prometheus on a free port, once it scrapes every target the launcher wrote."""
    assert PROMETHEUS is not None
    targets_file = stack.home / "prometheus-targets.json"
    config = local_scrape_config(targets_file)
    server = Prometheus(PROMETHEUS, config, tmp_path_factory.mktemp("prometheus"))
    try:
        server.wait_ready()
        expected = len(json.loads(targets_file.read_text()))
        wait_until(
            lambda: sum(t["health"] == "up" for t in server.targets()) == expected,
            30,
            lambda: f"targets not all up: {server.targets()}",
        )
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def served(stack: StackProcess, prometheus: Prometheus) -> Prometheus:
    """Two models' long requests interleaved on the one worker (switches, KV swapped out and back
    in), and one request refused; returns the Prometheus that scraped them."""
    first_is_decoding = threading.Event()
    # Each request holds far more tokens than one turn's quota (the SLO caps a round at 0.5 s),
    # so the second model's arrival makes the worker switch away from the first and back.
    with ThreadPoolExecutor(2) as pool:
        jobs = [pool.submit(stream_chat, stack.url, MODELS[0], 300, first_is_decoding.set)]
        assert first_is_decoding.wait(60)
        jobs.append(pool.submit(stream_chat, stack.url, MODELS[1], 300, lambda: None))
        for job in jobs:
            job.result()
    refused = {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(f"{stack.url}/v1/chat/completions", json=refused).status_code == 404
    return prometheus


def test_prometheus_stores_every_series_under_its_aegaeon_name(served):
    names = served.metric_names()  # every target was scraped before the fixture returned
    ours = {n for n in names if n.startswith("aegaeon:")}
    escaped = sorted(n for n in names if n.startswith("aegaeon_"))
    assert ours, f"no aegaeon: series among {names}"
    assert not escaped, f"stored under escaped names (format negotiation): {escaped}"
    assert ours <= series_names(), ours - series_names()


def test_prometheus_saw_the_worker_switch_between_the_models_and_back(served):
    def switches() -> dict[str, float]:
        result = served.query("sum by (model_name) (aegaeon:model_switches_total)")
        return {r["metric"]["model_name"]: float(r["value"][1]) for r in result}

    # Three at least: to the first model, to the second, back to the first.
    wait_until(
        lambda: set(switches()) >= set(MODELS) and sum(switches().values()) >= 3,
        30,
        lambda: f"switches per model: {switches()}",
    )


def test_every_dashboard_query_returns_a_series_after_traffic_that_switches_models(served):
    queries = [q for q in dashboard_queries() if q.panel not in GPU_ONLY]
    for query in queries:
        assert "$" not in query.expr, f"a Grafana variable the test does not fill: {query.expr}"
    empty = still_empty(served, queries, timeout=30)
    listing = "\n".join(f"  {q.dashboard} / {q.panel!r}: {q.expr}" for q in empty)
    assert not empty, f"{len(empty)} dashboard queries returned no series:\n{listing}"


def test_the_gpu_only_exclusions_name_panels_of_the_dashboards():
    titles = {q.panel for q in dashboard_queries()}
    assert set(GPU_ONLY) <= titles, set(GPU_ONLY) - titles
