"""Shared fixtures: real NATS and Redis servers on free ports, started by the suite itself."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from aegaeon.servers import ServerProcess, start_nats, start_redis


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A real nats-server (JetStream on) for the whole session."""
    server = start_nats(tmp_path_factory.mktemp("nats"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A real redis-server for the whole session."""
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def demo_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo models, written once per test session."""
    from aegaeon.model_store.demo import create_demo_models

    out = tmp_path_factory.mktemp("models")
    create_demo_models(out, progress=False)
    return out


@pytest.fixture(scope="session")
def bench_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two of ``bench serve``'s models, written once per test session."""
    from aegaeon.bench.serve_models import write_bench_models

    out = tmp_path_factory.mktemp("bench-models")
    write_bench_models(out, 2)
    return out
