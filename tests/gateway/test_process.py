"""``aegaeon serve gateway`` as a real process: answers /health once the cluster beats, serves a
completion, and exits cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import httpx
import pytest

from aegaeon.bus import Bus
from aegaeon.config import BusConfig
from aegaeon.servers import free_port

from .conftest import model_info
from .fake_backend import FakeBackend

pytestmark = pytest.mark.timeout(90)


async def test_gateway_process_serves_and_stops_on_sigterm(
    nats_server, redis_server, tiny_model, tiny_tokenizer
):
    prefix = "proc"
    config = BusConfig(nats_url=nats_server.url, redis_url=redis_server.url, prefix=prefix)
    bus = await Bus.connect(config, "fake-backend")
    backend = FakeBackend(
        bus,
        [model_info("tiny", tiny_model)],
        lambda text: tiny_tokenizer(text, add_special_tokens=False)["input_ids"],
        tiny_tokenizer.convert_tokens_to_ids("<|eos|>"),
    )
    await backend.start()
    port = free_port()
    env = {
        **os.environ,
        "AEGAEON_NATS_URL": nats_server.url,
        "AEGAEON_REDIS_URL": redis_server.url,
        "AEGAEON_PREFIX": prefix,
        "AEGAEON_HOME": str(tiny_model.parent / "home"),
    }
    argv = [sys.executable, "-m", "aegaeon.cli", "serve", "gateway", "--port", str(port)]
    proc = subprocess.Popen([*argv, "--gateway-id", "gw-proc"], env=env)
    try:
        # A first completion loads the tokenizer (transformers' import: seconds on a busy
        # machine); what is tested is that it is served, not how fast.
        timeout = httpx.Timeout(60.0)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=timeout) as http:
            for _ in range(300):
                await backend.beat("w0")
                try:
                    if (await http.get("/health")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the gateway never became healthy")
            body = {"model": "tiny", "prompt": "x", "max_tokens": 4}
            reply = await http.post("/v1/completions", json=body)
            assert reply.status_code == 200
            assert backend.submitted[-1].gateway_id == "gw-proc"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        await backend.stop()
        await bus.close()
