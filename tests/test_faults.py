"""Fault tolerance on the embedded stack (DESIGN.md §9): a request that was accepted ends with
exactly the tokens an uninterrupted run gives, or with an explicit error — never hangs, never
duplicates or drops a token. Each test injects one fault and is bounded in time."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from aegaeon.bench.stack_process import StackProcess
from aegaeon.protocol import SamplingParams
from aegaeon.servers import ServerProcess, start_nats, start_redis

pytestmark = pytest.mark.slow

MODEL = "demo-llama"
PROMPTS = [[11 + i, 22, 33 + i, 44, 55, 66 + i] for i in range(3)]
MAX_TOKENS = 60


def engine_greedy(models_dir: Path, prompt: list[int], max_tokens: int) -> list[int]:
    """The uninterrupted reference: the engine alone, greedy, eos ignored."""
    from aegaeon.gpu_worker.engine import Engine, EngineConfig

    engine = Engine(EngineConfig(device="cpu", arena_bytes=1 << 30))
    try:
        engine.register_model(MODEL, models_dir / MODEL)
        engine.switch_to(MODEL)
        sampling = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        engine.add_request("ref", MODEL, prompt, sampling)
        tokens: list[int] = []
        while not tokens or len(tokens) < max_tokens:
            tokens += [o.token_id for o in engine.step(["ref"])]
        return tokens
    finally:
        engine.close()


async def stream_tokens(url: str, prompt: list[int], started: asyncio.Event | None = None) -> dict:
    """Stream one greedy completion; returns its text pieces and how it ended."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "stream": True, "ignore_eos": True}  # fmt: skip
    pieces: list[str] = []
    async with (
        httpx.AsyncClient(timeout=httpx.Timeout(120.0)) as client,
        client.stream("POST", f"{url}/v1/completions", json=body) as response,
    ):
        if response.status_code != 200:
            return {
                "status": response.status_code,
                "pieces": pieces,
                "error": await response.aread(),
            }
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return {"status": 200, "pieces": pieces, "done": True}
            chunk = __import__("json").loads(line[6:])
            if "error" in chunk:
                return {"status": 200, "pieces": pieces, "error": chunk["error"]}
            choice = chunk["choices"][0]
            pieces.append(choice["text"])
            if started is not None and len(pieces) >= 5:
                started.set()
    return {"status": 200, "pieces": pieces, "done": False}


def find_service(stack: StackProcess, *words: str) -> psutil.Process:
    """The service process of the stack whose command line holds every word."""
    assert stack.process is not None
    for child in psutil.Process(stack.process.pid).children(recursive=True):
        try:
            cmdline = child.cmdline()
        except psutil.Error:
            continue
        if all(w in cmdline for w in words):
            return child
    raise LookupError(f"no service process with {words}")


@pytest.fixture(scope="module")
def servers(tmp_path_factory) -> Iterator[dict[str, ServerProcess]]:
    base = tmp_path_factory.mktemp("fault-servers")
    servers = {"nats": start_nats(base / "nats"), "redis": start_redis(base / "redis")}
    yield servers
    for server in servers.values():  # the restarted ones, not only the first
        server.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, demo_models_dir, servers) -> Iterator[StackProcess]:
    env = {"AEGAEON_NATS_URL": servers["nats"].url, "AEGAEON_REDIS_URL": servers["redis"].url,
           "AEGAEON_PREFIX": "faults"}  # fmt: skip
    home = tmp_path_factory.mktemp("fault-home")
    with StackProcess(home, models_dir=demo_models_dir, workers=2, env=env) as s:
        yield s


@pytest.fixture(scope="module")
def references(demo_models_dir) -> list[str]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_models_dir / MODEL)
    return [tokenizer.decode(engine_greedy(demo_models_dir, p, MAX_TOKENS)) for p in PROMPTS]


def run_with_fault(url: str, fault) -> list[dict]:
    """Start three streams, inject the fault once they are all under way, collect the results."""

    async def go() -> list[dict]:
        events = [asyncio.Event() for _ in PROMPTS]
        tasks = [asyncio.create_task(stream_tokens(url, p, e)) for p, e in zip(PROMPTS, events, strict=True)]  # fmt: skip
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 120)
        await asyncio.get_running_loop().run_in_executor(None, fault)
        return await asyncio.wait_for(asyncio.gather(*tasks), 240)

    return asyncio.run(go())


def assert_exact_or_explicit_error(results: list[dict], references: list[str]) -> None:
    for result, expected in zip(results, references, strict=True):
        if result.get("done"):
            assert "".join(result["pieces"]) == expected
        else:
            assert "error" in result, f"stream ended with neither [DONE] nor an error: {result}"
            assert expected.startswith("".join(result["pieces"]))


def test_killing_a_worker_mid_stream_loses_no_token(stack, references):
    def kill_busy_worker() -> None:
        find_service(stack, "worker", "--worker-id", "worker-0").send_signal(signal.SIGKILL)

    results = run_with_fault(stack.url, kill_busy_worker)
    assert all(r.get("done") for r in results), results
    assert_exact_or_explicit_error(results, references)
    stack.wait_ready()


def test_sigterm_drains_a_worker_without_losing_tokens(stack, references):
    def drain_worker() -> None:
        os.kill(find_service(stack, "worker", "--worker-id", "worker-1").pid, signal.SIGTERM)

    results = run_with_fault(stack.url, drain_worker)
    assert all(r.get("done") for r in results), results
    assert_exact_or_explicit_error(results, references)
    stack.wait_ready()


def test_scheduler_restart_keeps_requests_going(stack, references):
    def kill_scheduler() -> None:
        find_service(stack, "serve", "scheduler").send_signal(signal.SIGKILL)

    results = run_with_fault(stack.url, kill_scheduler)
    assert_exact_or_explicit_error(results, references)
    stack.wait_ready()
    # Served again after the restart.
    after = asyncio.run(stream_tokens(stack.url, PROMPTS[0]))
    assert after.get("done") and "".join(after["pieces"]) == references[0]


def test_nats_restart_ends_requests_cleanly_and_service_resumes(stack, servers, references):
    nats_server = servers["nats"]

    def restart_nats() -> None:
        nats_server.kill()
        time.sleep(1.0)
        servers["nats"] = start_nats(Path(nats_server.process.args[-1]), port=nats_server.port)

    results = run_with_fault(stack.url, restart_nats)
    assert_exact_or_explicit_error(results, references)
    stack.wait_ready()
    after = asyncio.run(stream_tokens(stack.url, PROMPTS[1]))
    assert after.get("done") and "".join(after["pieces"]) == references[1]


def test_redis_restart_ends_requests_cleanly_and_service_resumes(stack, servers, references):
    redis_server = servers["redis"]

    def restart_redis() -> None:
        redis_server.kill()
        time.sleep(1.0)
        data_dir = Path(redis_server.process.args[redis_server.process.args.index("--dir") + 1])
        servers["redis"] = start_redis(data_dir, port=redis_server.port)

    results = run_with_fault(stack.url, restart_redis)
    assert_exact_or_explicit_error(results, references)
    stack.wait_ready()
    after = asyncio.run(stream_tokens(stack.url, PROMPTS[2]))
    assert after.get("done") and "".join(after["pieces"]) == references[2]
