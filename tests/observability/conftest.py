"""One embedded stack (``aegaeon up``) for the observability tests, exporting its traces to a
real OTLP/HTTP receiver run by the test."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest

from aegaeon.bench.stack_process import StackProcess

from .otlp_receiver import OtlpReceiver

PREFIX = "obs"


@dataclass
class ObservedStack:
    """The running stack, its trace receiver and each service's /metrics URL."""

    stack: StackProcess
    receiver: OtlpReceiver
    metrics_urls: dict[str, str]


@pytest.fixture(scope="package")
def observed(
    tmp_path_factory, demo_models_dir, nats_server, redis_server
) -> Iterator[ObservedStack]:
    home = tmp_path_factory.mktemp("obs-home")
    with OtlpReceiver() as receiver:
        env = {
            "AEGAEON_NATS_URL": nats_server.url,
            "AEGAEON_REDIS_URL": redis_server.url,
            "AEGAEON_PREFIX": PREFIX,
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "200",
        }
        # A tight SLO keeps turns short, so requests of two models on the one worker take turns.
        slo = ["--slo-ttft", "1.0", "--slo-tbt", "0.02"]
        with StackProcess(home, models_dir=demo_models_dir, env=env, extra_args=slo) as stack:
            targets = json.loads((home / "prometheus-targets.json").read_text())
            urls = {t["labels"]["service"]: f"http://{t['targets'][0]}/metrics" for t in targets}
            yield ObservedStack(stack, receiver, urls)


def stream_chat(
    base_url: str,
    model: str,
    max_tokens: int,
    headers: dict[str, str],
    on_first_token: Callable[[], None] | None = None,
) -> list[str]:
    """One streamed chat completion of exactly ``max_tokens`` tokens; returns its SSE data lines
    (the last is ``[DONE]``). ``on_first_token`` is called when the first token arrives."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Say something about the sea."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    lines = []
    with httpx.stream(
        "POST", f"{base_url}/v1/chat/completions", json=body, headers=headers, timeout=120
    ) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: "):
                lines.append(line.removeprefix("data: "))
                if on_first_token is not None and len(lines) == 2:  # role chunk, then a token
                    on_first_token()
    return lines


def cold_models(base_url: str) -> list[str]:
    """Models resident on no worker (their next request needs a switch)."""
    cards = httpx.get(f"{base_url}/v1/models", timeout=10).json()["data"]
    return sorted(card["id"] for card in cards if card["residency"] == "cold")


def models_in_no_slot(base_url: str) -> list[str]:
    """Cold models that no worker's other weight slot holds either (their next switch copies
    weights): a worker's last switch left the model it switched away from in that slot."""
    runtime = httpx.get(f"{base_url}/v1/aegaeon/runtime", timeout=10).json()
    last_switch: dict[str, dict] = {}
    for event in runtime["recent"]:  # oldest first
        if event["kind"] == "switch":
            last_switch[event["worker_id"]] = event
    staged = {e["from_model"] for e in last_switch.values()}
    return [m for m in cold_models(base_url) if m not in staged]
