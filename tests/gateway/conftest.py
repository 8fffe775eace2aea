"""Gateway fixtures: a tiny model folder, the fake backend, and the real app served by uvicorn."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import uvicorn
from aegaeon.gateway.app import create_app
from aegaeon.gateway.main import server_config
from aegaeon.gateway.settings import GatewaySettings

from aegaeon.bus import Bus
from aegaeon.config import BusConfig
from aegaeon.protocol import ModelInfo
from aegaeon.servers import free_port
from aegaeon.state import Keys

from .fake_backend import FakeBackend, Script
from .tokenizer_factory import write_model

CONTEXT = 128


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("models") / "tiny", CONTEXT)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model))


def model_info(name: str, path: Path) -> ModelInfo:
    return ModelInfo(
        name=name,
        architecture="LlamaForCausalLM",
        model_type="llama",
        path=str(path),
        weight_bytes=1000,
        num_parameters=250,
        context_length=CONTEXT,
        dtype="float32",
    )


class Stack:
    """A served gateway and the fake backend behind it, with helpers for tests."""

    def __init__(self, base_url: str, app, backend: FakeBackend, redis, prefix: str) -> None:
        self.base_url = base_url
        self.app = app
        self.backend = backend
        self.redis = redis
        self.prefix = prefix

    @property
    def gateway(self):
        return self.app.state.gateway

    async def request_keys(self) -> list[bytes]:
        return [k async for k in self.redis.scan_iter(f"{self.prefix}:req:*")]

    async def settle(self) -> None:
        """Wait (up to 30 s: a busy machine) until no request is in flight in the gateway."""
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            if self.gateway.admission.in_flight == 0:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{self.gateway.admission.in_flight} requests still in flight")


async def serve_stack(
    nats_server,
    redis_server,
    tiny_model: Path,
    prefix: str,
    gateway_nats_url: str = "",
    backend_started: bool = True,
    **settings,
) -> AsyncIterator[Stack]:
    """The real app on a free port with a fake backend; each stack uses its own prefix.
    ``gateway_nats_url``: where the gateway reaches NATS (default the server, as the backend);
    ``backend_started=False``: the gateway starts before the backend answers anything."""
    bus_config = BusConfig(nats_url=nats_server.url, redis_url=redis_server.url, prefix=prefix)
    settings.setdefault("tokenizer_cache_dir", tiny_model.parent / "cache")
    gateway_bus = replace(bus_config, nats_url=gateway_nats_url or bus_config.nats_url)
    app = create_app(GatewaySettings(bus=gateway_bus, gateway_id=f"{prefix}-gw", **settings))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    models = [model_info("tiny", tiny_model), model_info("cold-one", tiny_model)]
    backend_bus = await Bus.connect(bus_config, "fake-backend")
    redis = aioredis.from_url(redis_server.url)

    async def record(request_id: str, ids: list[int]) -> None:
        key = Keys(prefix).output_tokens(request_id)
        if ids:
            await redis.rpush(key, *ids)
            await redis.expire(key, 600)

    backend = FakeBackend(
        backend_bus,
        models,
        lambda text: tok(text, add_special_tokens=False)["input_ids"],
        tok.convert_tokens_to_ids("<|eos|>"),
        Script(),
        record=record,
    )
    if backend_started:
        await backend.start()
    port = free_port()
    # The gateway's own uvicorn settings (main.py), as `aegaeon serve gateway` runs it.
    config = server_config(app, "127.0.0.1", port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    try:
        yield Stack(f"http://127.0.0.1:{port}", app, backend, redis, prefix)
    finally:
        server.should_exit = True
        await task
        await backend.stop()
        await backend_bus.close()
        await redis.aclose()


@pytest.fixture
async def stack(nats_server, redis_server, tiny_model, request) -> AsyncIterator[Stack]:
    prefix = "gw" + str(abs(hash(request.node.name)) % 10**8)
    async for s in serve_stack(nats_server, redis_server, tiny_model, prefix):
        s.backend.script = Script()
        yield s
