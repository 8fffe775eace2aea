"""``aegaeon serve scheduler`` as a real process: it comes up, publishes its state, and exits
cleanly (code 0) on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from typing import Any

from aegaeon.bus import Bus
from aegaeon.config import BusConfig
from aegaeon.protocol import ListModels, ModelList, SchedulerState


async def test_scheduler_process_publishes_state_and_exits_cleanly_on_sigterm(
    nats_server, redis_server
):
    config = BusConfig(nats_server.url, redis_server.url, prefix=f"p{uuid.uuid4().hex[:10]}")
    bus = await Bus.connect(config, "test")
    states: list[SchedulerState] = []

    async def no_models(_q: Any, msg: Any) -> None:
        await bus.reply(msg, ModelList([]))

    async def on_state(state: SchedulerState, _msg: Any) -> None:
        states.append(state)

    await bus.subscribe(bus.subjects.models("list"), ListModels, no_models)
    await bus.subscribe(bus.subjects.scheduler_state, SchedulerState, on_state)
    env = {
        **os.environ,
        "AEGAEON_NATS_URL": config.nats_url,
        "AEGAEON_REDIS_URL": config.redis_url,
        "AEGAEON_PREFIX": config.prefix,
        "OTEL_TRACES_EXPORTER": "none",
    }
    argv = [sys.executable, "-m", "aegaeon.cli", "serve", "scheduler", "--policy", "round-robin",
            "--policy-option", "quota_s=0.2", "--heartbeat-timeout", "2"]  # fmt: skip
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(300):
            if states or proc.poll() is not None:
                break
            await asyncio.sleep(0.05)
        assert states, "no SchedulerState within 15 s"
        assert states[0].policy == "round-robin"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        await bus.close()
