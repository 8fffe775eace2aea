"""End to end through the official ``openai`` client against the embedded stack (`aegaeon up`):
real NATS, Redis, model-store, scheduler, gpu-worker and gateway processes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import nats
import openai
import pytest
import redis
from transformers import AutoTokenizer

from aegaeon.bench.stack_process import StackProcess
from aegaeon.protocol import Heartbeat, RequestDone, SamplingParams, WorkerEvent, decode

pytestmark = pytest.mark.slow

PREFIX = "e2e"
MODELS = ["demo-llama", "demo-qwen2", "demo-mistral"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, demo_models_dir, nats_server, redis_server) -> Iterator[StackProcess]:
    env = {
        "AEGAEON_NATS_URL": nats_server.url,
        "AEGAEON_REDIS_URL": redis_server.url,
        "AEGAEON_PREFIX": PREFIX,
    }
    with StackProcess(tmp_path_factory.mktemp("home"), models_dir=demo_models_dir, env=env) as s:
        yield s


def engine_greedy(
    models_dir: Path, model: str, prompt: list[int], max_tokens: int, ignore_eos: bool = False,
    bias: dict[int, float] | None = None,
) -> list[int]:  # fmt: skip
    """The engine's own greedy output, in process, for the same prompt (``bias``: a
    logit_bias)."""
    from aegaeon.gpu_worker.engine import Engine, EngineConfig

    engine = Engine(EngineConfig(device="cpu", arena_bytes=1 << 30))
    try:
        engine.register_model(model, models_dir / model)
        engine.switch_to(model)
        engine.add_request(
            "ref", model, prompt,
            SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=ignore_eos,
                           logit_bias=bias or {}),
        )  # fmt: skip
        tokens: list[int] = []
        while True:
            outputs = engine.step(["ref"])
            tokens += [o.token_id for o in outputs]
            if any(o.finish_reason for o in outputs):
                return tokens
    finally:
        engine.close()


def chat_prompt(models_dir: Path, model: str, text: str) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(models_dir / model)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
    )
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


async def stream_chat(client: openai.AsyncOpenAI, model: str, text: str, max_tokens: int) -> str:
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": text}],
        stream=True,
        max_tokens=max_tokens,
        temperature=0,
    )
    parts = []
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    return "".join(parts)


def test_a_cold_models_stream_says_queued_then_loading_before_its_first_token(stack, demo_models_dir):  # fmt: skip
    # First in this module: no model has been loaded yet, so demo-mistral is cold.
    body = {"model": "demo-mistral", "stream": True, "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": "Where is the lighthouse?"}]}  # fmt: skip
    with httpx.stream("POST", f"{stack.url}/v1/chat/completions", json=body, timeout=120) as r:
        lines = [line for line in r.iter_lines() if line]
    first_text = next(i for i, line in enumerate(lines) if '"content":"' in line and '"content":""' not in line)  # fmt: skip
    comments = [line for line in lines[:first_text] if line.startswith(":")]
    assert comments[0].startswith(": aegaeon queued position=")
    loading = [c for c in comments if c.startswith(": aegaeon loading model=demo-mistral")]
    assert loading, comments
    assert not any(line.startswith(":") for line in lines[first_text:])
    # The official client reads the same kind of stream unchanged.
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="none")
    streamed = client.chat.completions.create(
        model="demo-mistral", messages=body["messages"], stream=True, max_tokens=8, temperature=0
    )
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    expected_ids = engine_greedy(demo_models_dir, "demo-mistral",
                                 chat_prompt(demo_models_dir, "demo-mistral", body["messages"][0]["content"]), 8)  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(demo_models_dir / "demo-mistral")
    assert text == tokenizer.decode(expected_ids, skip_special_tokens=True)


def test_three_models_stream_concurrently_with_the_engines_greedy_text(stack, demo_models_dir):
    prompts = {model: f"Tell me about the {word} sea." for model, word in
               zip(MODELS, ["north", "quiet", "wine-dark"], strict=True)}  # fmt: skip

    async def run_all() -> dict[str, str]:
        client = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="none")
        texts = await asyncio.gather(*(stream_chat(client, m, prompts[m], 24) for m in MODELS))
        await client.close()
        return dict(zip(MODELS, texts, strict=True))

    streamed = asyncio.run(run_all())
    for model in MODELS:
        tokenizer = AutoTokenizer.from_pretrained(demo_models_dir / model)
        expected_ids = engine_greedy(
            demo_models_dir, model, chat_prompt(demo_models_dir, model, prompts[model]), 24
        )
        expected = tokenizer.decode(expected_ids, skip_special_tokens=True)
        assert streamed[model] == expected, model


def test_completions_with_token_ids_match_the_engine_for_every_model(stack, demo_models_dir):
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="none")
    prompt = [5, 17, 42, 99, 7, 61, 23, 88]
    for model in [*MODELS, "demo-gpt2"]:
        text = (
            client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
            .choices[0]
            .text
        )
        tokenizer = AutoTokenizer.from_pretrained(demo_models_dir / model)
        expected = tokenizer.decode(engine_greedy(demo_models_dir, model, prompt, 12),
                                    skip_special_tokens=True)  # fmt: skip
        assert text == expected, model


def test_a_tiny_temperature_beside_greedy_streams_is_greedy_and_harms_none(stack, demo_models_dir):
    """temperature 1e-300 is 0 in float32: once it made the draw raise and failed every request
    of its batch. Now it samples greedily, and the requests sent with it stay exact."""
    prompts = [[5, 17, 42, 99, 7, 61, 23, 88], [3, 4, 5, 6, 7], [100, 200, 300], [9, 9, 9, 9]]
    temperatures = [0.0, 0.0, 0.0, 1e-300]

    async def run_all() -> list:
        client = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="none")
        calls = [client.completions.create(model="demo-llama", prompt=p, max_tokens=12,
                                           temperature=t, extra_body={"ignore_eos": True})
                 for p, t in zip(prompts, temperatures, strict=True)]  # fmt: skip
        done = await asyncio.gather(*calls)
        await client.close()
        return done

    tokenizer = AutoTokenizer.from_pretrained(demo_models_dir / "demo-llama")
    for prompt, completion in zip(prompts, asyncio.run(run_all()), strict=True):
        choice = completion.choices[0]
        expected = engine_greedy(demo_models_dir, "demo-llama", prompt, 12, ignore_eos=True)
        assert choice.finish_reason == "length"
        assert choice.text == tokenizer.decode(expected, skip_special_tokens=True), prompt


def test_n_choices_are_greedy_alike_and_seeded_apart(stack, demo_models_dir):
    """Each of ``n`` choices is a request of its own: greedy ones all give the engine's text,
    with a seed choice i samples exactly as a lone request with seed + i would, and a batch of
    prompts gets each prompt's own text."""
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="none")
    prompt = [5, 17, 42, 99, 7, 61, 23, 88]
    tokenizer = AutoTokenizer.from_pretrained(demo_models_dir / "demo-llama")
    expected = tokenizer.decode(engine_greedy(demo_models_dir, "demo-llama", prompt, 12),
                                skip_special_tokens=True)  # fmt: skip
    greedy = client.completions.create(
        model="demo-llama", prompt=prompt, max_tokens=12, temperature=0, n=3
    )
    assert [c.text for c in greedy.choices] == [expected] * 3
    assert greedy.usage is not None and greedy.usage.prompt_tokens == len(prompt)

    def sampled(n: int, seed: int) -> list[str]:
        reply = client.completions.create(model="demo-llama", prompt=prompt, max_tokens=12,
                                          temperature=1.0, n=n, seed=seed,
                                          extra_body={"ignore_eos": True})  # fmt: skip
        return [c.text for c in reply.choices]

    pair = sampled(2, seed=11)
    assert pair[0] != pair[1]
    assert sampled(1, seed=12) == [pair[1]]
    other = [3, 4, 5, 6, 7]
    batch = client.completions.create(
        model="demo-llama", prompt=[prompt, other], max_tokens=12, temperature=0
    )
    texts = [tokenizer.decode(engine_greedy(demo_models_dir, "demo-llama", p, 12),
                              skip_special_tokens=True) for p in (prompt, other)]  # fmt: skip
    assert [c.text for c in batch.choices] == texts


def test_logit_bias_forces_and_bans_tokens_on_the_real_engine(stack, demo_models_dir):
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="none")
    prompt = [5, 17, 42, 99, 7, 61, 23, 88]
    tokenizer = AutoTokenizer.from_pretrained(demo_models_dir / "demo-llama")

    def served(bias: dict[int, float]) -> str:
        reply = client.completions.create(
            model="demo-llama", prompt=prompt, max_tokens=4, temperature=0,
            logit_bias={str(t): b for t, b in bias.items()}, extra_body={"ignore_eos": True},
        )  # fmt: skip
        return reply.choices[0].text

    greedy = engine_greedy(demo_models_dir, "demo-llama", prompt, 4, ignore_eos=True)
    forced = next(t for t in range(300, 400) if t not in greedy)
    assert served({forced: 100.0}) == tokenizer.decode([forced] * 4, skip_special_tokens=True)
    ban = {greedy[0]: -100.0}
    banned = engine_greedy(demo_models_dir, "demo-llama", prompt, 4, ignore_eos=True, bias=ban)
    assert banned[0] != greedy[0]
    assert served(ban) == tokenizer.decode(banned, skip_special_tokens=True)


def test_top_draws_the_runtime_view_of_the_running_stack(stack):
    # After the tests above, every worker has served; the view shows them and their models. A
    # worker's resident model comes from its last heartbeat, which may change while top draws:
    # top must show a model the view named just before or just after it ran.
    def resident_models() -> set[str]:
        view = httpx.get(f"{stack.url}/v1/aegaeon/runtime", timeout=10).json()
        return {w["resident_model"] for w in view["workers"] if w["resident_model"]}

    resident = resident_models()
    top = subprocess.run([sys.executable, "-m", "aegaeon.cli", "top", "--once", "--gateway", stack.url],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "COLUMNS": "200"})  # a wide terminal: no wrapped names  # fmt: skip
    assert top.returncode == 0, top.stderr
    resident |= resident_models()
    view = httpx.get(f"{stack.url}/v1/aegaeon/runtime", timeout=10).json()
    assert view["scheduler"]["alive"] and resident and view["recent"]
    for worker in view["workers"]:
        assert worker["worker_id"] in top.stdout
    assert any(model in top.stdout for model in resident), (resident, top.stdout)
    assert "gateway:" not in top.stdout


def test_models_endpoint_lists_every_registered_model(stack, demo_models_dir):
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="none")
    listed = {m.id for m in client.models.list().data}
    assert listed == {p.name for p in demo_models_dir.iterdir() if (p / "config.json").exists()}


def test_unknown_model_is_a_404_openai_error(stack):
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="none")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=2)


def test_cancel_mid_stream_stops_generation_and_frees_kv(stack, nats_server, redis_server):
    """The worker ends the request as aborted after a few of its 2000 tokens (it would need
    seconds to produce them all), then reports every KV block free."""

    async def run() -> tuple[Heartbeat, int]:
        nc = await nats.connect(nats_server.url)
        done: asyncio.Queue[RequestDone] = asyncio.Queue()

        async def on_event(msg) -> None:
            event = decode(msg.data, WorkerEvent)
            if isinstance(event, RequestDone):
                await done.put(event)

        await nc.subscribe(f"{PREFIX}.worker.*.events", cb=on_event)
        client = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="none")
        stream = await client.completions.create(
            model="demo-llama", prompt=[3, 4, 5, 6], max_tokens=2000, temperature=0, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        received = 0
        async for _chunk in stream:
            received += 1
            if received == 5:
                break
        await stream.close()
        await client.close()
        ended = await asyncio.wait_for(done.get(), 10)
        assert ended.finish_reason == "abort" and ended.num_output_tokens < 1000, ended
        # The worker must report the blocks free again: watch its heartbeats.
        sub = await nc.subscribe(f"{PREFIX}.worker.heartbeat")
        beat = None
        for _ in range(100):
            beat = decode((await sub.next_msg(timeout=5)).data, Heartbeat)
            if beat.num_requests == 0 and beat.kv_blocks_free == beat.kv_blocks_total:
                break
        await nc.close()
        assert beat is not None
        return beat, received

    beat, received = asyncio.run(run())
    assert received == 5
    assert beat.num_requests == 0
    assert beat.kv_blocks_free == beat.kv_blocks_total
    # Nothing about running requests is left in Redis without an expiry.
    client = redis.Redis.from_url(redis_server.url)
    for key in client.scan_iter(f"{PREFIX}:*"):
        assert client.ttl(key) > 0 or key.decode().endswith(":queue"), key
    assert client.hlen(f"{PREFIX}:queue") == 0
