"""A model's lifecycle through a whole ``aegaeon up`` (its own NATS with a user per service, so a
subject missing from a role's permissions shows; its own Redis; model-store, scheduler, a CPU
worker, gateway): deployed while other models stream, drained while one of its requests
streams, removed without a trace. Every streamed text is compared with the engine's own greedy
output for the same prompt (the deployed models are links to a demo model, so its tokens are
theirs)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import httpx
import pytest
import redis
from transformers import AutoTokenizer

from aegaeon.bench.stack_process import wait_healthy
from aegaeon.protocol import SamplingParams, SubmitRequest, decode
from aegaeon.servers import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PREFIX = "life"
SOURCE = "demo-llama"  # every deployed model here is a link to it
OTHERS = {"demo-llama": [5, 17, 42, 99, 7, 61], "demo-qwen2": [3, 4, 5, 6, 7, 8]}
PROMPT = [9, 31, 64, 2, 77]


@dataclass
class Stack:
    url: str
    models_dir: Path
    home: Path
    shm: Path
    redis_url: str


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, demo_models_dir: Path) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("lifecycle")
    models = root / "models"
    models.mkdir()
    for name in OTHERS:
        (models / name).symlink_to(demo_models_dir / name)
    home, port = root / "home", free_port()
    shm = Path("/dev/shm" if Path("/dev/shm").is_dir() else root) / f"aegaeon-life-{uuid.uuid4().hex[:8]}"  # fmt: skip
    shm.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AEGAEON_NATS", "AEGAEON_REDIS", "AEGAEON_API_KEYS"))}  # fmt: skip
    env |= {"AEGAEON_HOME": str(home), "AEGAEON_PREFIX": PREFIX, "AEGAEON_SHM_DIR": str(shm)}
    command = [sys.executable, "-m", "aegaeon.cli", "up", "--models-dir", str(models),
               "--port", str(port), "--workers", "1", "--arena-bytes", str(512 * 1024**2)]  # fmt: skip
    home.mkdir()
    with open(home / "up.log", "wb") as log:
        launcher = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, launcher, 180, f"see {home / 'up.log'} and {home / 'logs'}")
        redis_url = json.loads((home / "connection.json").read_text())["AEGAEON_REDIS_URL"]
        yield Stack(url, models, home, shm, redis_url)
    finally:
        launcher.send_signal(signal.SIGTERM)
        try:
            launcher.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
        subprocess.run(["rm", "-rf", str(shm)], check=False)


# ---------------------------------------------------------------- references and clients


@cache
def greedy_text(models_dir: Path, model: str, prompt: tuple[int, ...], max_tokens: int) -> str:
    """The engine's own greedy output for ``prompt``, in this process, as text."""
    from aegaeon.gpu_worker.engine import Engine, EngineConfig

    engine = Engine(EngineConfig(device="cpu", arena_bytes=256 << 20, host_kv_bytes=16 << 20))
    try:
        engine.register_model(model, models_dir / model)
        engine.switch_to(model)
        sampling = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        engine.add_request("ref", model, list(prompt), sampling)
        tokens: list[int] = []
        while not tokens or len(tokens) < max_tokens:
            tokens += [o.token_id for o in engine.step(["ref"])]
    finally:
        engine.close()
    tokenizer = AutoTokenizer.from_pretrained(models_dir / model)
    return tokenizer.decode(tokens, skip_special_tokens=True)


def body(model: str, prompt: list[int], max_tokens: int, stream: bool = True) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": stream, "ignore_eos": True}  # fmt: skip


async def stream_text(
    http: httpx.AsyncClient, model: str, prompt: list[int], max_tokens: int,
    first_token: asyncio.Event | None = None,
) -> str:  # fmt: skip
    """A streamed completion's text; ``first_token`` is set when its first text arrives."""
    parts: list[str] = []
    async with http.stream("POST", "/v1/completions", json=body(model, prompt, max_tokens)) as reply:  # fmt: skip
        assert reply.status_code == 200, await reply.aread()
        async for line in reply.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line.removeprefix("data: "))
                assert "error" not in chunk, chunk
                parts += [c["text"] for c in chunk["choices"]]
                if first_token is not None and "".join(parts):
                    first_token.set()
    return "".join(parts)


def aegaeon(*words: str, url: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "aegaeon.cli", *words, "--gateway", url]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


async def until(check, what: str, timeout: float = 30.0):
    """Poll ``check()`` (a coroutine function) until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if result := await check():
            return result
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


# ---------------------------------------------------------------- the lifecycle


def test_a_model_deployed_while_others_stream_loads_serves_and_leaves_their_tokens_exact(
    stack: Stack, demo_models_dir: Path
) -> None:
    streamed: dict[str, list[tuple[float, float, str]]] = {m: [] for m in OTHERS}

    async def keep_streaming(http: httpx.AsyncClient, model: str, stop: asyncio.Event) -> None:
        """One stream after another until ``stop``: some stream is always under way."""
        clock = asyncio.get_running_loop().time
        while not stop.is_set():
            began = clock()
            text = await stream_text(http, model, OTHERS[model], 48)
            streamed[model].append((began, clock(), text))

    async def run() -> tuple[dict, str, list[str], float, float]:
        async with httpx.AsyncClient(base_url=stack.url, timeout=180) as http:
            stop, clock = asyncio.Event(), asyncio.get_running_loop().time
            loops = [asyncio.create_task(keep_streaming(http, m, stop)) for m in OTHERS]

            async def each_streamed() -> bool:
                return all(streamed.values())

            # The module's first requests: each model's first load (host cache, worker) comes
            # first, which a busy CI machine has been seen to stretch past 30 s.
            await until(each_streamed, "a first stream of each model", timeout=120)
            asked = clock()
            deployed = await http.post("/v1/aegaeon/models", json={
                "name": "fresh-llama", "path": str(demo_models_dir / SOURCE), "priority": "low"})  # fmt: skip
            assert deployed.status_code == 202, deployed.text
            seen: list[str] = []

            async def ready() -> bool:
                card = (await http.get("/v1/models/fresh-llama")).json()
                seen.append(card["state"])
                return card["state"] == "ready"

            await until(ready, "fresh-llama to be ready")
            served = await http.post("/v1/completions", json=body("fresh-llama", PROMPT, 24, stream=False))  # fmt: skip
            assert served.status_code == 200, served.text
            done = clock()
            stop.set()
            await asyncio.gather(*loops)
            return deployed.json(), served.json()["choices"][0]["text"], seen, asked, done

    card, served, seen, asked, done = asyncio.run(run())
    assert (card["state"], card["id"], card["priority"]) == ("loading", "fresh-llama", "low")
    assert set(seen) <= {"loading", "ready"} and seen[-1] == "ready"
    assert (stack.models_dir / "fresh-llama").resolve() == (demo_models_dir / SOURCE).resolve()
    assert served == greedy_text(demo_models_dir, SOURCE, tuple(PROMPT), 24)
    for model, streams in streamed.items():
        assert streams[0][0] < asked and streams[-1][1] > done  # streaming all along
        expected = greedy_text(demo_models_dir, model, tuple(OTHERS[model]), 48)
        assert [text for _, _, text in streams] == [expected] * len(streams), model


def test_a_model_drained_while_it_streams_finishes_it_takes_no_more_and_goes_without_a_trace(
    stack: Stack, demo_models_dir: Path
) -> None:
    name = "drained-llama"
    deployed = aegaeon("models", "deploy", str(demo_models_dir / SOURCE), "--name", name, "--wait", url=stack.url)  # fmt: skip
    assert deployed.returncode == 0, deployed.stderr
    assert f"deployed {name}: loading" in deployed.stdout and f"{name} is ready" in deployed.stdout
    prioritized = aegaeon("models", "priority", name, "high", url=stack.url)
    assert prioritized.returncode == 0, prioritized.stderr
    assert f"{name} is now high priority (ready)" in prioritized.stdout
    pinned = aegaeon("models", "pin", name, "1", url=stack.url)
    assert pinned.returncode == 0, pinned.stderr
    assert f"{name} is now pinned on 1 instance (ready)" in pinned.stdout
    unpinned = aegaeon("models", "pin", name, "0", url=stack.url)  # the drain below: unpinned
    assert unpinned.returncode == 0, unpinned.stderr
    assert f"{name} is now unpinned (ready)" in unpinned.stdout

    async def drain_while_streaming() -> tuple[str, dict, httpx.Response, dict, httpx.Response]:
        async with httpx.AsyncClient(base_url=stack.url, timeout=180) as http:
            first = asyncio.Event()
            running = asyncio.create_task(stream_text(http, name, PROMPT, 400, first))
            await asyncio.wait_for(first.wait(), 120)
            drained = (await http.post(f"/v1/aegaeon/models/{name}/drain")).json()
            refused = await http.post("/v1/completions", json=body(name, PROMPT, 8))
            card = (await http.get(f"/v1/models/{name}")).json()
            in_use = await http.delete(f"/v1/aegaeon/models/{name}")
            assert not running.done()  # all of the above happened while it streamed
            text = await running

            async def idle() -> bool:  # the scheduler's state: nothing of it left
                card = (await http.get(f"/v1/models/{name}")).json()
                return card["queued"] + card["running"] == 0

            await until(idle, f"{name}'s requests to end")
            return text, drained, refused, card, in_use

    text, drained, refused, card, in_use = asyncio.run(drain_while_streaming())
    assert drained["state"] == "draining" and card["state"] == "draining"
    assert drained["priority"] == card["priority"] == "high"  # a drain keeps the class
    assert drained["pin"] == card["pin"] == 0
    assert refused.status_code == 409 and refused.headers["x-should-retry"] == "false"
    error = refused.json()["error"]
    assert error["code"] == "model_draining" and f"'{name}' is draining" in error["message"]
    assert in_use.status_code == 409 and in_use.json()["error"]["code"] == "model_in_use"
    assert text == greedy_text(demo_models_dir, SOURCE, tuple(PROMPT), 400)  # finished, exact
    assert list(stack.shm.glob(f"aegaeon-up-*/aegaeon-local/{name}.safetensors"))  # cached

    removed = aegaeon("models", "remove", name, url=stack.url)
    assert removed.returncode == 0, removed.stderr
    assert f"removed {name}: removed the link" in removed.stdout

    listed = [c["id"] for c in httpx.get(f"{stack.url}/v1/models").json()["data"]]
    assert name not in listed and SOURCE in listed
    gone = httpx.post(f"{stack.url}/v1/completions", json=body(name, PROMPT, 4, stream=False))
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    again = aegaeon("models", "remove", name, url=stack.url)
    assert again.returncode == 1 and "HTTP 404" in again.stderr
    assert not (stack.models_dir / name).is_symlink()
    assert name not in json.loads((stack.models_dir / ".aegaeon-lifecycle.json").read_text())
    assert not list(stack.shm.glob(f"aegaeon-up-*/aegaeon-local/{name}.safetensors"))
    assert_no_redis_key_keeps(stack, name)

    async def evicted() -> bool:  # it was resident: the worker served it last
        async with httpx.AsyncClient(base_url=stack.url, timeout=10) as http:
            view = (await http.get("/v1/aegaeon/runtime")).json()
        return all(w["resident_model"] != name for w in view["workers"])

    asyncio.run(until(evicted, f"the workers to evict {name}"))


def assert_no_redis_key_keeps(stack: Stack, name: str) -> None:
    """Nothing in Redis outlives the model: no key names it, the scheduler's queue holds none
    of its requests, and its requests' records expire (as every finished request's do)."""
    client = redis.Redis.from_url(stack.redis_url)
    try:
        keys = list(client.scan_iter(f"{PREFIX}:*"))
        assert not [k for k in keys if name.encode() in k]
        queued = client.hgetall(f"{PREFIX}:queue")
        assert all(decode(v, SubmitRequest).model != name for v in queued.values())
        for key in keys:
            if client.type(key) == b"hash" and client.hget(key, "model") == name.encode():
                assert client.ttl(key) > 0, key
    finally:
        client.close()


def test_a_model_idle_past_its_keep_alive_leaves_the_worker_and_the_host_cache_and_serves_again(
    stack: Stack, demo_models_dir: Path
) -> None:
    model, prompt = "demo-qwen2", OTHERS["demo-qwen2"]
    expected = greedy_text(demo_models_dir, model, tuple(prompt), 16)

    def cached() -> list[Path]:
        return list(stack.shm.rglob(f"{model}.safetensors"))

    async def serve_once(http: httpx.AsyncClient) -> str:
        served = await http.post("/v1/completions", json=body(model, prompt, 16, stream=False))
        assert served.status_code == 200, served.text
        return served.json()["choices"][0]["text"]

    async def card(http: httpx.AsyncClient) -> dict:
        return (await http.get(f"/v1/models/{model}")).json()

    async def run() -> tuple[str, str, dict]:
        async with httpx.AsyncClient(base_url=stack.url, timeout=180) as http:
            first = await serve_once(http)

            async def resident() -> bool:
                return bool((await card(http))["resident_on"]) and bool(cached())

            await until(resident, f"{model} resident on the worker and in the host cache")
            done = await asyncio.to_thread(aegaeon, "models", "keep-alive", model, "1s", url=stack.url)  # fmt: skip
            assert done.returncode == 0, done.stderr
            assert f"{model} is now evicted after 1 s idle" in done.stdout

            async def off_the_worker() -> bool:
                return not (await card(http))["resident_on"]

            async def out_of_the_cache() -> bool:
                return not cached()

            await until(off_the_worker, f"{model} evicted from the worker")
            # The store keeps the file while the worker's lease from its last load runs (60 s:
            # the time a worker has to map what it asked for).
            await until(out_of_the_cache, f"{model} evicted from the host cache", timeout=120)
            again = await serve_once(http)  # loaded again, as any cold model is
            reset = await http.post(f"/v1/aegaeon/models/{model}/keep_alive", json={"seconds": 0})
            assert reset.status_code == 200, reset.text
            return first, again, reset.json()

    first, again, reset = asyncio.run(run())
    assert first == again == expected
    assert reset["keep_alive_s"] == 0
    scheduler_log = (stack.home / "logs" / "scheduler.log").read_text(errors="replace")
    assert f"{model} idle for 1 s (its keep-alive): evicted" in scheduler_log


def test_no_service_was_refused_a_subject(stack: Stack) -> None:
    """Every new subject (lifecycle verbs, news, unload) is in its roles' NATS permissions."""
    logs = {p.name: p.read_text(errors="replace") for p in (stack.home / "logs").glob("*.log")}
    assert "nats.log" in logs and "gateway.log" in logs
    for name, text in logs.items():
        assert "Violation" not in text and "NATS refused" not in text, (name, text[-2000:])
