"""No single scheduler to lose: ``aegaeon up --schedulers 2`` runs a leader and a standby; the
leader is SIGKILLed while streams of two models are under way; the standby takes the lease in
Redis and resumes them from Redis; every stream ends with exactly the tokens an uninterrupted
greedy run gives; the supervisor brings the killed scheduler back as a standby. The take-over
time (kill → the new leader's first command to a worker) is printed (``pytest -s``)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import nats
import psutil
import pytest
import redis.asyncio as aioredis
from aegaeon.scheduler.lease import Holder
from transformers import AutoTokenizer

from aegaeon.bench.stack_process import StackProcess
from aegaeon.protocol import SamplingParams
from aegaeon.state import Keys

pytestmark = pytest.mark.slow

PREFIX = "failover"
STREAMS = [("demo-llama", [11, 22, 33, 44]), ("demo-llama", [12, 23, 34, 45, 56]),
           ("demo-qwen2", [13, 24, 35, 46]), ("demo-qwen2", [14, 25, 36, 47, 58])]  # fmt: skip
MAX_TOKENS = 300  # ≥ 1 s per stream on the CPU: all of them are mid-stream at the kill
TAKE_OVER_BOUND_S = 15.0  # generous (ttl 3 s + one 1 s attempt + resume): fails only if broken


@pytest.fixture(scope="module")
def stack(tmp_path_factory, demo_models_dir, nats_server, redis_server) -> Iterator[StackProcess]:
    env = {"AEGAEON_NATS_URL": nats_server.url, "AEGAEON_REDIS_URL": redis_server.url,
           "AEGAEON_PREFIX": PREFIX}  # fmt: skip
    home = tmp_path_factory.mktemp("failover-home")
    with StackProcess(home, models_dir=demo_models_dir, workers=1, env=env,
                      extra_args=["--schedulers", "2"]) as s:  # fmt: skip
        yield s


def engine_greedy(models_dir: Path, model: str, prompt: list[int]) -> list[int]:
    """The uninterrupted reference: the engine alone, greedy, eos ignored."""
    from aegaeon.gpu_worker.engine import Engine, EngineConfig

    engine = Engine(EngineConfig(device="cpu", arena_bytes=1 << 30))
    try:
        engine.register_model(model, models_dir / model)
        engine.switch_to(model)
        sampling = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
        engine.add_request("ref", model, prompt, sampling)
        tokens: list[int] = []
        while len(tokens) < MAX_TOKENS:
            tokens += [o.token_id for o in engine.step(["ref"])]
        return tokens
    finally:
        engine.close()


@pytest.fixture(scope="module")
def references(demo_models_dir) -> list[str]:
    texts = []
    for model, prompt in STREAMS:
        tokenizer = AutoTokenizer.from_pretrained(demo_models_dir / model)
        tokens = engine_greedy(demo_models_dir, model, prompt)
        texts.append(tokenizer.decode(tokens, skip_special_tokens=True))
    return texts


async def stream(url: str, model: str, prompt: list[int], started: asyncio.Event) -> dict:
    """One greedy streamed completion: its text, the completion tokens usage counts, how it ended."""
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}  # fmt: skip
    result: dict = {"pieces": [], "tokens": None, "done": False}
    async with (
        httpx.AsyncClient(timeout=httpx.Timeout(120.0)) as client,
        client.stream("POST", f"{url}/v1/completions", json=body) as response,
    ):
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                result["done"] = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                if chunk.get("usage"):
                    result["tokens"] = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    result["pieces"].append(choice["text"])
                if len(result["pieces"]) >= 5:
                    started.set()
    return result


async def lease_holder(redis: aioredis.Redis) -> Holder | None:
    return Holder.parse(await redis.get(Keys(PREFIX).scheduler_leader))


async def until(condition, timeout: float, what: str):
    """Poll the coroutine function ``condition`` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while not (value := await condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)
    return value


def scheduler_pids(stack: StackProcess) -> set[int]:
    """The scheduler processes of the stack that run now."""
    assert stack.process is not None
    pids = set()
    for child in psutil.Process(stack.process.pid).children(recursive=True):
        try:
            if "scheduler" in child.cmdline() and child.status() != psutil.STATUS_ZOMBIE:
                pids.add(child.pid)
        except psutil.Error:
            continue
    return pids


def last_run_of_log(stack: StackProcess, scheduler_id: str) -> str:
    """What the scheduler's log holds since its last (re)start."""
    text = (stack.home / "logs" / f"{scheduler_id}.log").read_text(errors="replace")
    return text.rsplit("=== ", 1)[-1]


def is_leader_gauge(stack: StackProcess, scheduler_id: str) -> float:
    """``aegaeon:scheduler_is_leader`` from the scheduler's /metrics (its port from the
    Prometheus targets ``aegaeon up`` writes)."""
    targets = json.loads((stack.home / "prometheus-targets.json").read_text())
    [target] = [t["targets"][0] for t in targets if t["labels"]["service"] == scheduler_id]
    text = httpx.get(f"http://{target}/metrics", timeout=5).text
    [line] = [x for x in text.splitlines() if x.startswith("aegaeon:scheduler_is_leader ")]
    return float(line.split()[1])


@pytest.mark.timeout(420)
def test_killing_the_leader_mid_stream_hands_over_to_the_standby_and_every_stream_ends_exactly(
    stack, nats_server, redis_server, references
):
    async def go() -> tuple[list[dict], Holder, Holder, float, float]:
        redis = aioredis.Redis.from_url(redis_server.url)
        nc = await nats.connect(nats_server.url)
        commands: list[float] = []  # when each command to a worker was seen

        async def on_command(_msg) -> None:
            commands.append(time.monotonic())

        await nc.subscribe(f"{PREFIX}.worker.*.cmd", cb=on_command)
        try:
            old = await until(lambda: lease_holder(redis), 30, "a leader")
            assert old.pid in scheduler_pids(stack) and len(scheduler_pids(stack)) == 2
            assert is_leader_gauge(stack, old.scheduler_id) == 1.0
            events = [asyncio.Event() for _ in STREAMS]
            tasks = [asyncio.create_task(stream(stack.url, m, p, e))
                     for (m, p), e in zip(STREAMS, events, strict=True)]  # fmt: skip
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 120)
            os.kill(old.pid, signal.SIGKILL)
            killed_at = time.monotonic()

            async def new_holder() -> Holder | None:
                holder = await lease_holder(redis)
                return holder if holder is not None and holder.pid != old.pid else None

            new = await until(new_holder, TAKE_OVER_BOUND_S, "a new lease holder")
            leased_at = time.monotonic()
            await until(lambda: _any_after(commands, leased_at), 60, "the new leader's command")
            scheduling_at = next(t for t in commands if t > leased_at)
            results = await asyncio.wait_for(asyncio.gather(*tasks), 240)
            assert await lease_holder(redis) == new  # one term, no flapping
            return results, old, new, leased_at - killed_at, scheduling_at - killed_at
        finally:
            await nc.close()
            await redis.aclose()

    results, old, new, lease_s, take_over_s = asyncio.run(go())
    print(f"\nscheduler take-over: {old.scheduler_id} (pid {old.pid}) killed; lease taken by "
          f"{new.scheduler_id} (pid {new.pid}) after {lease_s:.2f} s; its first command to a "
          f"worker {take_over_s:.2f} s after the kill")  # fmt: skip
    for result, expected in zip(results, references, strict=True):
        assert result["done"], result
        assert "".join(result["pieces"]) == expected
        assert result["tokens"] == MAX_TOKENS
    assert new.pid in scheduler_pids(stack)
    assert take_over_s < TAKE_OVER_BOUND_S, take_over_s

    # The supervisor restarts the killed scheduler; it comes back as a standby, not a leader.
    standby = next(s for s in ("scheduler-0", "scheduler-1") if s != new.scheduler_id)
    deadline = time.monotonic() + 60
    while f"standing by: lease held by {new}" not in last_run_of_log(stack, standby):
        assert time.monotonic() < deadline, last_run_of_log(stack, standby)
        time.sleep(0.05)
    assert len(scheduler_pids(stack)) == 2
    assert is_leader_gauge(stack, new.scheduler_id) == 1.0
    assert is_leader_gauge(stack, standby) == 0.0


async def _any_after(times: list[float], since: float) -> bool:
    return any(t > since for t in times)
