"""Fault tolerance on the embedded stack (DESIGN.md §9): every stream under way when a worker is
killed or drained, the scheduler is killed, or NATS or Redis restart, ends with exactly the
tokens an uninterrupted run gives. A worker fault is injected into the worker that holds the
streams (seen on NATS), and the test checks that the streams were re-assigned. Each test is
bounded in time."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import nats
import psutil
import pytest

from aegaeon.bench.stack_process import StackProcess
from aegaeon.protocol import (
    AssignRequest,
    RequestDone,
    SamplingParams,
    WorkerCommand,
    WorkerEvent,
    decode,
)
from aegaeon.servers import ServerProcess, start_nats, start_redis

pytestmark = pytest.mark.slow

MODEL = "demo-llama"
PROMPTS = [[11 + i, 22, 33 + i, 44, 55, 66 + i] for i in range(3)]
MAX_TOKENS = 300  # ≥ 1 s per stream on the CPU: a fault 5 tokens in finds them all running
PREFIX = "faults"


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
           "AEGAEON_PREFIX": PREFIX}  # fmt: skip
    home = tmp_path_factory.mktemp("fault-home")
    with StackProcess(home, models_dir=demo_models_dir, workers=2, env=env) as s:
        yield s


@pytest.fixture(scope="module")
def references(demo_models_dir) -> list[str]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_models_dir / MODEL)
    return [tokenizer.decode(engine_greedy(demo_models_dir, p, MAX_TOKENS), skip_special_tokens=True)
            for p in PROMPTS]  # fmt: skip


class Assignments:
    """Every AssignRequest the scheduler sends (watched on NATS), as (worker id, request id) in
    order: which worker holds which stream, and whether a stream was given to another worker
    after a fault (the recovery path ran)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self.done_on: dict[str, str] = {}  # request id → the worker that finished it

    async def watch(self, nats_url: str) -> nats.aio.client.Client:
        nc = await nats.connect(nats_url)

        async def on_command(msg) -> None:
            command = decode(msg.data, WorkerCommand)
            if isinstance(command, AssignRequest):
                self.seen.append((msg.subject.split(".")[2], command.request_id))

        async def on_event(msg) -> None:
            event = decode(msg.data, WorkerEvent)
            if isinstance(event, RequestDone) and event.finish_reason != "abort":
                self.done_on[event.request_id] = event.worker_id

        await nc.subscribe(f"{PREFIX}.worker.*.cmd", cb=on_command)
        await nc.subscribe(f"{PREFIX}.worker.*.events", cb=on_event)
        return nc

    def held_by(self, worker: str, before: int) -> set[str]:
        return {r for w, r in self.seen[:before] if w == worker}

    def busiest(self) -> str:
        """The worker holding most streams now."""
        holder: dict[str, str] = {}
        for worker, request_id in self.seen:
            holder[request_id] = worker
        return Counter(holder.values()).most_common(1)[0][0]

    def moved_from(self, worker: str, since: int) -> set[str]:
        """Requests held by ``worker`` before index ``since`` and assigned elsewhere after it."""
        held = {r for w, r in self.seen[:since] if w == worker}
        return {r for w, r in self.seen[since:] if r in held and w != worker}


def run_with_fault(
    url: str, fault, nats_url: str | None = None
) -> tuple[list[dict], Assignments, int]:
    """Start three streams, inject the fault once they are all under way (``fault`` gets the
    assignments seen so far), collect the results; also what the scheduler assigned, and how
    many assignments came before the fault."""
    assignments = Assignments()

    async def go() -> tuple[list[dict], int]:
        nc = await assignments.watch(nats_url) if nats_url else None
        events = [asyncio.Event() for _ in PROMPTS]
        tasks = [asyncio.create_task(stream_tokens(url, p, e)) for p, e in zip(PROMPTS, events, strict=True)]  # fmt: skip
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 120)
        before = len(assignments.seen)
        await asyncio.get_running_loop().run_in_executor(None, fault, assignments)
        results = await asyncio.wait_for(asyncio.gather(*tasks), 240)
        if nc is not None:
            await nc.drain()  # the last events (RequestDone) may still wait for their callback
        return results, before

    results, before = asyncio.run(go())
    return results, assignments, before


def assert_every_stream_exact(results: list[dict], references: list[str]) -> None:
    for result, expected in zip(results, references, strict=True):
        assert result.get("done"), f"stream did not finish: {result}"
        assert "".join(result["pieces"]) == expected


def test_killing_the_worker_that_holds_streams_loses_no_token(stack, servers, references):
    killed: list[str] = []

    def kill_busy_worker(assignments: Assignments) -> None:
        killed.append(assignments.busiest())
        find_service(stack, "worker", "--worker-id", killed[0]).send_signal(signal.SIGKILL)

    results, assignments, before = run_with_fault(stack.url, kill_busy_worker, servers["nats"].url)
    assert_every_stream_exact(results, references)
    assert assignments.moved_from(killed[0], before), "no stream was re-assigned after the kill"
    stack.wait_ready()


def test_sigterm_drains_the_worker_that_holds_streams_without_losing_tokens(
    stack, servers, references
):
    drained: list[str] = []

    def drain_busy_worker(assignments: Assignments) -> None:
        drained.append(assignments.busiest())
        os.kill(find_service(stack, "worker", "--worker-id", drained[0]).pid, signal.SIGTERM)

    results, assignments, before = run_with_fault(stack.url, drain_busy_worker, servers["nats"].url)
    assert_every_stream_exact(results, references)
    # Each stream it held either ended in its last turn there or went on elsewhere.
    moved = assignments.moved_from(drained[0], before)
    finished_there = {r for r, w in assignments.done_on.items() if w == drained[0]}
    held = assignments.held_by(drained[0], before)
    assert held <= moved | finished_there, (held, assignments.seen, assignments.done_on)
    stack.wait_ready()


def test_scheduler_restart_resumes_every_stream_exactly(stack, servers, references):
    def kill_scheduler(_assignments: Assignments) -> None:
        find_service(stack, "serve", "scheduler").send_signal(signal.SIGKILL)

    results, _, _ = run_with_fault(stack.url, kill_scheduler)
    assert_every_stream_exact(results, references)
    stack.wait_ready()
    after = asyncio.run(stream_tokens(stack.url, PROMPTS[0]))
    assert after.get("done") and "".join(after["pieces"]) == references[0]


def test_nats_restart_resumes_every_stream_exactly(stack, servers, references):
    nats_server = servers["nats"]

    def restart_nats(_assignments: Assignments) -> None:
        nats_server.kill()
        time.sleep(1.0)
        servers["nats"] = start_nats(Path(nats_server.process.args[-1]), port=nats_server.port)

    results, _, _ = run_with_fault(stack.url, restart_nats)
    assert_every_stream_exact(results, references)
    stack.wait_ready()
    after = asyncio.run(stream_tokens(stack.url, PROMPTS[1]))
    assert after.get("done") and "".join(after["pieces"]) == references[1]


def test_redis_restart_resumes_every_stream_exactly(stack, servers, references):
    redis_server = servers["redis"]

    def restart_redis(_assignments: Assignments) -> None:
        redis_server.kill()
        time.sleep(1.0)
        data_dir = Path(redis_server.process.args[redis_server.process.args.index("--dir") + 1])
        servers["redis"] = start_redis(data_dir, port=redis_server.port)

    results, _, _ = run_with_fault(stack.url, restart_redis)
    assert_every_stream_exact(results, references)
    stack.wait_ready()
    after = asyncio.run(stream_tokens(stack.url, PROMPTS[2]))
    assert after.get("done") and "".join(after["pieces"]) == references[2]
