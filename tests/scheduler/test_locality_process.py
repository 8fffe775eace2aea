"""Locality-aware placement through real processes: two nodes (``AEGAEON_NODE``), each with its
model-store and a CPU worker, one scheduler. A model cached only in node B's host cache is served
by node B's worker, although the equally idle worker of node A comes first by id (where
round-robin places a request when it knows nothing of the caches). The test stands in for the
gateway: it submits on the bus and reads the workers' events."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from scheduler_harness import wait_for

from aegaeon.bus import Bus
from aegaeon.config import BusConfig
from aegaeon.protocol import (
    EnsureCached,
    Heartbeat,
    ModelReply,
    RequestDone,
    SamplingParams,
    SchedulerState,
    StoreHeartbeat,
    SubmitReply,
    SubmitRequest,
    WorkerEvent,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

MODELS = ["demo-llama", "demo-qwen2"]
CACHED_ON_B = "demo-qwen2"
GATEWAY = "gw-locality"


@contextlib.contextmanager
def children() -> Iterator[list[subprocess.Popen]]:
    """A list to :func:`spawn` into; every child is stopped (SIGTERM, then SIGKILL) at the end."""
    started: list[subprocess.Popen] = []
    try:
        yield started
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.terminate()
        for proc in started:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


def spawn(started: list[subprocess.Popen], logs: Path, env: dict[str, str], name: str,
          node: str | None, *argv: str) -> None:  # fmt: skip
    """``aegaeon serve *argv`` on ``node`` (``AEGAEON_NODE``), its output in ``logs/name.log``."""
    child_env = {**env, "AEGAEON_NODE": node} if node else env
    with (logs / f"{name}.log").open("wb") as log:
        command = [sys.executable, "-m", "aegaeon.cli", "serve", *argv]
        started.append(
            subprocess.Popen(command, env=child_env, stdout=log, stderr=subprocess.STDOUT)
        )


async def test_a_model_cached_only_on_node_b_is_served_by_node_bs_worker(
    nats_server, redis_server, demo_models_dir: Path, tmp_path: Path
):
    models = tmp_path / "models"
    models.mkdir()
    for name in MODELS:
        (models / name).symlink_to(demo_models_dir / name, target_is_directory=True)
    config = BusConfig(nats_server.url, redis_server.url, prefix=f"l{uuid.uuid4().hex[:10]}")
    env = {
        **os.environ,
        "AEGAEON_NATS_URL": config.nats_url,
        "AEGAEON_REDIS_URL": config.redis_url,
        "AEGAEON_PREFIX": config.prefix,
        "AEGAEON_SHM_DIR": str(tmp_path / "shm"),
        "AEGAEON_HOME": str(tmp_path / "home"),
        "OTEL_TRACES_EXPORTER": "none",
    }
    (tmp_path / "shm").mkdir()
    bus = await Bus.connect(config, "test")
    workers: dict[str, Heartbeat] = {}
    stores: dict[str, StoreHeartbeat] = {}
    states: list[SchedulerState] = []
    done: list[RequestDone] = []

    async def on_beat(beat: Heartbeat, _msg: Any) -> None:
        workers[beat.worker_id] = beat

    async def on_store(beat: StoreHeartbeat, _msg: Any) -> None:
        stores[beat.store_id] = beat

    async def on_state(state: SchedulerState, _msg: Any) -> None:
        states.append(state)

    async def on_event(event: Any, _msg: Any) -> None:
        if isinstance(event, RequestDone):
            done.append(event)

    await bus.subscribe(bus.subjects.heartbeat, Heartbeat, on_beat)
    await bus.subscribe(bus.subjects.store_heartbeat, StoreHeartbeat, on_store)
    await bus.subscribe(bus.subjects.scheduler_state, SchedulerState, on_state)
    await bus.subscribe(bus.subjects.all_worker_events, WorkerEvent, on_event)
    cache = str(256 * 1024**2)
    try:
        with children() as started:
            for node in ("node-a", "node-b"):
                spawn(started, tmp_path, env, f"store-{node}", node, "model-store",
                      "--models-dir", str(models), "--cache-bytes", cache)  # fmt: skip
            spawn(started, tmp_path, env, "scheduler", None, "scheduler", "--policy",
                  "round-robin", "--policy-option", "quota_s=0.2")  # fmt: skip
            for worker_id, node in (("w1", "node-a"), ("w2", "node-b")):
                spawn(started, tmp_path, env, worker_id, node, "worker", "--worker-id",
                      worker_id, "--threads", "1", "--arena-bytes", str(1 << 29))  # fmt: skip
            await wait_for(lambda: set(stores) == {"node-a", "node-b"}, 60, "both stores")
            reply = await bus.request(bus.subjects.models("ensure.node-b"),
                                      EnsureCached(CACHED_ON_B), ModelReply, timeout=60)  # fmt: skip
            assert reply.error == "", reply.error
            await wait_for(lambda: CACHED_ON_B in stores["node-b"].cached, 10, "node b's beat")
            assert CACHED_ON_B not in stores["node-a"].cached
            await wait_for(
                lambda: bool(states) and {w.worker_id for w in states[-1].workers} == {"w1", "w2"},
                90, "both workers joined the scheduler",
            )  # fmt: skip
            assert (workers["w1"].node, workers["w2"].node) == ("node-a", "node-b")
            await wait_for(  # the scheduler places by what it heard, not by what the test saw
                lambda: CACHED_ON_B in states[-1].cached.get("node-b", []), 10,
                "the scheduler to hear node b's cache",
            )  # fmt: skip
            request = SubmitRequest("r-b", CACHED_ON_B, [1, 2, 3, 4],
                                    SamplingParams(max_tokens=2), GATEWAY, time.time())  # fmt: skip
            assert (await bus.request(bus.subjects.submit, request, SubmitReply)).accepted
            await wait_for(lambda: any(d.request_id == "r-b" for d in done), 60, "r-b to end")
            finished = next(d for d in done if d.request_id == "r-b")
            assert (finished.worker_id, finished.finish_reason) == ("w2", "length")
            assert not any(p.poll() for p in started), "a child exited"
    finally:
        await bus.close()
