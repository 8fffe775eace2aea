"""A worker asks its own node's model-store (``models.ensure.<store id>``): another node's store
would answer with a path in shared memory this worker cannot map. With no store of that id
answering (one node, ids not set alike), any store does. A real worker, NATS and Redis."""

from __future__ import annotations

import asyncio

import pytest
from aegaeon.gpu_worker.engine import Engine, EngineConfig
from engine_helpers import GREEDY, PROMPTS
from worker_harness import GATEWAY, WorkerHarness

from aegaeon.protocol import AssignRequest, RunTurn, TurnDone

MODEL = "demo-llama"


def _serve_one(engine, models, nats_server, redis_server, **stores) -> tuple[list[str], str]:
    async def run() -> tuple[list[str], str]:
        async with WorkerHarness(engine, models, nats_server.url, redis_server.url, **stores) as w:
            await w.send(AssignRequest("r", MODEL, PROMPTS[0], GREEDY, GATEWAY, 0.0))
            await w.send(RunTurn(1, MODEL, ["r"], quota_s=1e6))
            assert isinstance(await w.turn_ended(), TurnDone)
            return w.ensured, w.bus.subjects.models("ensure")

    return asyncio.run(run())


def _engine(tmp_path) -> Engine:
    return Engine(EngineConfig(device="cpu", dtype="float32", arena_bytes=256 << 20,
                               host_kv_bytes=16 << 20, host_kv_dir=str(tmp_path)))  # fmt: skip


@pytest.mark.parametrize(
    ("store_id", "asks"),
    [("node-a", ".node-a"),  # its node's store answers on its own subject
     ("node-b", "")],  # no store of its id: any store (the shared subject)
)  # fmt: skip
def test_a_worker_asks_the_model_store_of_its_node_else_any(
    demo_models_dir, nats_server, redis_server, tmp_path, store_id, asks
):
    engine = _engine(tmp_path)
    try:
        asked, shared = _serve_one(engine, demo_models_dir, nats_server, redis_server,
                                   store_id=store_id, local_store="node-a")  # fmt: skip
    finally:
        engine.close()
    assert asked and set(asked) == {shared + asks}
