"""Every scheduling policy end to end through the embedded stack (`aegaeon up --policy …`): real
NATS, Redis, model-store, scheduler, gpu-worker and gateway processes, requests over HTTP/SSE.

Each run sends a short trace concurrently over ``/v1/completions`` (token-id prompts, greedy)
and checks that every request ends with exactly its ``max_tokens`` and the engine's own greedy
text. Prompts are chosen so the greedy output has no EOS within ``max_tokens`` (the gateway
does not take ``ignore_eos``; it is sent anyway, as clients of other servers do).

The last test is the exactness rule under the aegaeon policy with forced swaps: three models on
a worker whose arena holds two models' weights, long requests interleaved, and the worker's own
events (``TurnDone.swapped_out``, ``SwitchDone.bytes``) prove KV went to the host pool and back
and weights were copied in again between turns.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nats
import openai
import pytest
from transformers import AutoTokenizer

from aegaeon.bench.stack_process import StackProcess
from aegaeon.protocol import RequestDone, SamplingParams, SwitchDone, TurnDone, WorkerEvent, decode

pytestmark = pytest.mark.slow

TWO = ["demo-llama", "demo-qwen2"]
THREE = ["demo-llama", "demo-qwen2", "demo-mistral"]
MiB = 1 << 20


# ------------------------------------------------------------------ helpers


def subset(demo_models_dir: Path, root: Path, names: list[str]) -> Path:
    """A models folder holding only ``names`` (symlinks to the session's demo models)."""
    folder = root / "-".join(n.removeprefix("demo-") for n in names)
    if not folder.exists():
        folder.mkdir(parents=True)
        for name in names:
            (folder / name).symlink_to(demo_models_dir / name, target_is_directory=True)
    return folder


@functools.cache
def engine_greedy(models_dir: Path, model: str, prompt: tuple[int, ...], max_tokens: int) -> tuple[int, ...]:  # fmt: skip
    """The engine's uninterrupted greedy output (stopping at EOS, as the gateway asks)."""
    from aegaeon.gpu_worker.engine import Engine, EngineConfig

    engine = Engine(EngineConfig(device="cpu", arena_bytes=512 * MiB, host_kv_bytes=8 * MiB))
    try:
        engine.register_model(model, models_dir / model)
        engine.switch_to(model)
        engine.add_request("ref", model, list(prompt), SamplingParams(max_tokens=max_tokens, temperature=0))  # fmt: skip
        tokens: list[int] = []
        while True:
            outputs = engine.step(["ref"])
            tokens += [o.token_id for o in outputs]
            if any(o.finish_reason for o in outputs):
                return tuple(tokens)
    finally:
        engine.close()


def full_length_prompt(models_dir: Path, model: str, seed: int, length: int, max_tokens: int) -> list[int]:  # fmt: skip
    """A deterministic token-id prompt whose greedy output runs to ``max_tokens`` without EOS."""
    for attempt in range(20):
        prompt = tuple(3 + (31 * seed + 17 * attempt + 7 * j * j) % 1500 for j in range(length))
        if len(engine_greedy(models_dir, model, prompt, max_tokens)) == max_tokens:
            return list(prompt)
    raise AssertionError(f"no prompt without an early EOS for {model}")


def expected_text(models_dir: Path, model: str, prompt: list[int], max_tokens: int) -> str:
    tokenizer = AutoTokenizer.from_pretrained(models_dir / model)
    ids = engine_greedy(models_dir, model, tuple(prompt), max_tokens)
    return str(tokenizer.decode(list(ids), skip_special_tokens=True))


async def stream_completion(client: openai.AsyncOpenAI, model: str, prompt: list[int], max_tokens: int) -> tuple[str, int, str | None]:  # fmt: skip
    """(text, completion tokens from usage, finish reason) of one streamed completion."""
    stream = await client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    parts, tokens, finish = [], -1, None
    async for chunk in stream:
        for choice in chunk.choices:
            parts.append(choice.text)
            finish = choice.finish_reason or finish
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return "".join(parts), tokens, finish


Trace = list[tuple[str, list[int], int]]  # (model, prompt, max_tokens)


def make_trace(models_dir: Path, models: list[str], per_model: int, max_tokens: int, length: int = 12) -> Trace:  # fmt: skip
    return [
        (
            model,
            full_length_prompt(models_dir, model, 10 * m + i, length + 5 * i, max_tokens),
            max_tokens,
        )
        for i in range(per_model)
        for m, model in enumerate(models)
    ]


def send_all(url: str, trace: Trace) -> list[tuple[str, int, str | None]]:
    async def run() -> list[tuple[str, int, str | None]]:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", timeout=120)
        try:
            return list(await asyncio.gather(*(stream_completion(client, *r) for r in trace)))
        finally:
            await client.close()

    return asyncio.run(run())


def assert_exact(models_dir: Path, trace: Trace, results: list[tuple[str, int, str | None]]) -> None:  # fmt: skip
    for (model, prompt, max_tokens), (text, tokens, finish) in zip(trace, results, strict=True):
        assert tokens == max_tokens, (model, prompt, tokens)
        assert finish == "length", (model, prompt, finish)
        assert text == expected_text(models_dir, model, prompt, max_tokens), (model, prompt)


@contextmanager
def stack(home: Path, models_dir: Path, policy: str, servers: tuple, workers: int = 1, extra: list[str] | None = None) -> Iterator[StackProcess]:  # fmt: skip
    nats_server, redis_server = servers
    env = {
        "AEGAEON_NATS_URL": nats_server.url,
        "AEGAEON_REDIS_URL": redis_server.url,
        "AEGAEON_PREFIX": prefix(policy),
    }
    with StackProcess(home, models_dir=models_dir, workers=workers, policy=policy,
                      extra_args=extra, env=env) as running:  # fmt: skip
        yield running


def prefix(policy: str) -> str:
    return "pe2e_" + policy.replace("-", "_")


@pytest.fixture(scope="module")
def servers(nats_server, redis_server) -> tuple:
    return nats_server, redis_server


# ------------------------------------------------------------------ one run per policy


@pytest.mark.parametrize("policy", ["aegaeon", "request-level", "static-mux", "round-robin"])
def test_policy_serves_two_models_concurrently_with_the_engines_greedy_text(policy, demo_models_dir, servers, tmp_path):  # fmt: skip
    models_dir = subset(demo_models_dir, tmp_path / "models", TWO)
    trace = make_trace(demo_models_dir, TWO, per_model=3, max_tokens=10)
    with stack(tmp_path / "home", models_dir, policy, servers) as running:
        results = send_all(running.url, trace)
    assert_exact(demo_models_dir, trace, results)


def test_dedicated_policy_serves_its_one_model_on_its_one_worker(demo_models_dir, servers, tmp_path):  # fmt: skip
    # dedicated needs one instance per model: one worker, one model (the other policies' runs
    # use two models on one worker).
    models_dir = subset(demo_models_dir, tmp_path / "models", ["demo-llama"])
    trace = make_trace(demo_models_dir, ["demo-llama"], per_model=6, max_tokens=10)
    with stack(tmp_path / "home", models_dir, "dedicated", servers) as running:
        results = send_all(running.url, trace)
    assert_exact(demo_models_dir, trace, results)


# ------------------------------------------------------------------ exactness under swaps


def two_model_arena(demo_models_dir: Path) -> int:
    """An arena whose two weight slots (half of it) just hold the largest of THREE: the third
    model must be copied in again whenever its turn comes."""
    import torch
    from aegaeon.gpu_worker.arena import align_up, slot_need
    from aegaeon.gpu_worker.weights_loader import load_spec

    need = max(slot_need(load_spec(m, demo_models_dir / m), torch.float32) for m in THREE)
    return 4 * align_up(need) + 4 * MiB


async def watch_events(url: str, subject: str, seen: list, ready: asyncio.Event, stop: asyncio.Event) -> None:  # fmt: skip
    nc = await nats.connect(url)
    sub = await nc.subscribe(subject)
    ready.set()
    while not stop.is_set():
        try:
            msg = await sub.next_msg(timeout=0.2)
        except nats.errors.TimeoutError:
            continue
        seen.append(decode(msg.data, WorkerEvent))
    await nc.close()


async def last_turn_reported(events: list, requests: int, timeout: float = 60.0) -> None:
    """Wait until every request's RequestDone arrived and a TurnDone followed the last of them
    (a worker reports its turn after the tokens and finishes of that turn)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        done = [i for i, e in enumerate(events) if isinstance(e, RequestDone)]
        if len(done) >= requests and any(isinstance(e, TurnDone) for e in events[done[-1] :]):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(
        f"the workers did not report every request's end and its turn: {events[-5:]}"
    )


def test_aegaeon_policy_keeps_tokens_exact_when_kv_is_swapped_and_weights_switched(demo_models_dir, servers, tmp_path):  # fmt: skip
    models_dir = subset(demo_models_dir, tmp_path / "models", THREE)
    # A TTFT target of 0.5 s caps every quota at 0.2 s (QMAX = 0.4 TTFT), shorter than the
    # 120 steps of any batch however fast or slow the machine is: each batch yields while the
    # other models wait, so its KV is swapped out and its model switched away, every run.
    trace = make_trace(demo_models_dir, THREE, per_model=2, max_tokens=120, length=20)
    arena = two_model_arena(demo_models_dir)
    subject = f"{prefix('aegaeon')}.worker.*.events"
    events: list = []
    with stack(tmp_path / "home", models_dir, "aegaeon", servers,
               extra=["--arena-bytes", str(arena), "--slo-ttft", "0.5"]) as running:  # fmt: skip

        async def run() -> list[tuple[str, int, str | None]]:
            ready, stop = asyncio.Event(), asyncio.Event()
            watcher = asyncio.create_task(watch_events(servers[0].url, subject, events, ready, stop))  # fmt: skip
            await ready.wait()
            results = await asyncio.to_thread(send_all, running.url, trace)
            await last_turn_reported(events, len(trace))
            stop.set()
            await watcher
            return results

        results = asyncio.run(run())
    assert_exact(demo_models_dir, trace, results)
    turns = [e for e in events if isinstance(e, TurnDone)]
    swapped = [rid for t in turns for rid in t.swapped_out]
    # A copy made while the turn waited, or in the background while another model decoded.
    copies = [e for e in events if isinstance(e, SwitchDone) and e.bytes + e.prefetched_bytes > 0]
    assert swapped, "no KV was swapped out: the run did not exercise swapping"
    assert len(copies) >= len(THREE) + 1, "weights were not copied in again between turns"
    # Turns really interleaved: some model had a turn, lost the device, and came back.
    order = [t.model for t in turns if t.steps]
    assert any(order[i] != order[i + 1] and order[i] in order[i + 2 :] for i in range(len(order) - 2)), order  # fmt: skip
