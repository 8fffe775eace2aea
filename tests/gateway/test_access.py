"""Keys (401, allow-lists), rate limits (429), admission (503), /v1/models and /health, served."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from aegaeon.gateway.auth import hash_key
from openai import AsyncOpenAI, AuthenticationError, NotFoundError

from aegaeon.protocol import RequestDone, SwitchDone, TurnDone

from .conftest import CONTEXT, serve_stack
from .fake_backend import Script

pytestmark = pytest.mark.timeout(60)

BODY = {"model": "tiny", "prompt": "x", "max_tokens": 3}


@pytest.fixture
async def keyed_stack(nats_server, redis_server, tiny_model, tmp_path):
    keys = {
        "keys": [
            {"name": "alice", "sha256": hash_key("sk-alice"), "rpm": 2},
            {"name": "bob", "sha256": hash_key("sk-bob"), "models": ["cold-one"]},
            {"name": "carol", "sha256": hash_key("sk-carol"), "tpm": 40},
        ]
    }
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(keys))
    async for s in serve_stack(
        nats_server, redis_server, tiny_model, "keyed", api_keys_file=str(path)
    ):
        yield s


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_missing_or_wrong_key_is_401(keyed_stack):
    async with httpx.AsyncClient(base_url=keyed_stack.base_url) as http:
        missing = await http.post("/v1/completions", json=BODY)
        wrong = await http.post("/v1/completions", json=BODY, headers=auth("sk-mallory"))
        models = await http.get("/v1/models")
    for response in (missing, wrong, models):
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
    api = AsyncOpenAI(base_url=keyed_stack.base_url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(AuthenticationError):
        await api.completions.create(model="tiny", prompt="x")
    assert keyed_stack.backend.submitted == []


async def test_valid_key_is_served(keyed_stack):
    api = AsyncOpenAI(base_url=keyed_stack.base_url + "/v1", api_key="sk-alice", max_retries=0)
    reply = await api.completions.create(model="tiny", prompt="x", max_tokens=3)
    assert reply.usage.completion_tokens == 3
    assert keyed_stack.backend.submitted[-1].api_key_id == "alice"


async def test_key_sees_and_uses_only_its_allowed_models(keyed_stack):
    api = AsyncOpenAI(base_url=keyed_stack.base_url + "/v1", api_key="sk-bob", max_retries=0)
    listed = await api.models.list()
    assert [m.id for m in listed.data] == ["cold-one"]
    with pytest.raises(NotFoundError):
        await api.completions.create(model="tiny", prompt="x")


async def test_requests_over_rpm_get_429_with_retry_after(keyed_stack):
    async with httpx.AsyncClient(base_url=keyed_stack.base_url) as http:
        codes = [
            (await http.post("/v1/completions", json=BODY, headers=auth("sk-alice")))
            for _ in range(3)
        ]
    assert [r.status_code for r in codes] == [200, 200, 429]
    assert int(codes[2].headers["retry-after"]) >= 1
    assert codes[2].json()["error"]["type"] == "rate_limit_error"
    await keyed_stack.settle()
    assert len(keyed_stack.backend.submitted) == 2


async def test_tokens_over_tpm_get_429_and_unused_tokens_are_refunded(keyed_stack):
    async with httpx.AsyncClient(base_url=keyed_stack.base_url) as http:
        big = {"model": "tiny", "prompt": "x", "max_tokens": 30}
        first = await http.post("/v1/completions", json=big, headers=auth("sk-carol"))
        second = await http.post("/v1/completions", json=big, headers=auth("sk-carol"))
        assert first.status_code == 200  # used ~30 of 40 tokens, all it asked for
        assert second.status_code == 429
        keyed_stack.backend.script = Script(text="H")
        small = {"model": "tiny", "prompt": "x", "max_tokens": 5}
        third = await http.post("/v1/completions", json=small, headers=auth("sk-carol"))
        fourth = await http.post("/v1/completions", json=small, headers=auth("sk-carol"))
    # "H" is short: the third request used 2 of its 5 tokens ("H" and EOS), got the rest back.
    assert third.status_code == 200 and fourth.status_code == 200


async def test_admission_full_is_503_with_retry_after(nats_server, redis_server, tiny_model):
    async for stack in serve_stack(nats_server, redis_server, tiny_model, "adm", max_in_flight=1):
        stack.backend.script = Script(hang=True)
        async with httpx.AsyncClient(base_url=stack.base_url) as http:
            first = asyncio.create_task(http.post("/v1/completions", json=BODY, timeout=5))
            while not stack.backend.submitted:
                await asyncio.sleep(0.01)
            refused = await http.post("/v1/completions", json=BODY)
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["type"] == "overloaded_error"
            first.cancel()
        await stack.settle()
        assert len(stack.backend.submitted) == 1


async def test_one_key_holding_its_share_of_slots_cannot_block_another_key(
    nats_server, redis_server, tiny_model, tmp_path
):
    """The greedy key's streams hang (never read, never finishing): past its share it gets a
    503 naming the key, while another key is still admitted beside it."""
    path = tmp_path / "keys.json"
    keys = [{"name": "greedy", "sha256": hash_key("sk-greedy")},
            {"name": "polite", "sha256": hash_key("sk-polite"), "max_in_flight": 1}]  # fmt: skip
    path.write_text(json.dumps({"keys": keys}))
    async for stack in serve_stack(nats_server, redis_server, tiny_model, "perkey",
                                   api_keys_file=str(path), max_in_flight=8,
                                   max_in_flight_per_key=2):  # fmt: skip
        stack.backend.script = Script(hang=True)
        async with httpx.AsyncClient(base_url=stack.base_url) as http:

            def post(key: str) -> asyncio.Task:
                return asyncio.create_task(
                    http.post("/v1/completions", json=BODY, headers=auth(key), timeout=10)
                )

            held = [post("sk-greedy"), post("sk-greedy")]
            while len(stack.backend.submitted) < 2:
                await asyncio.sleep(0.01)
            refused = await http.post("/v1/completions", json=BODY, headers=auth("sk-greedy"))
            assert refused.status_code == 503 and "greedy" in refused.json()["error"]["message"]
            polite = post("sk-polite")
            while len(stack.backend.submitted) < 3:  # admitted past the greedy key's streams
                await asyncio.sleep(0.01)
            second = await http.post("/v1/completions", json=BODY, headers=auth("sk-polite"))
            assert second.status_code == 503  # its own cap from the keys file: 1
            for task in [*held, polite]:
                task.cancel()
        await stack.settle()
        assert len(stack.backend.submitted) == 3


async def test_models_lists_every_registered_model_even_when_nothing_is_loaded(stack):
    api = AsyncOpenAI(base_url=stack.base_url + "/v1", api_key="x", max_retries=0)
    listed = await api.models.list()
    cards = {m.id: m.model_dump() for m in listed.data}
    assert set(cards) == {"tiny", "cold-one"}
    assert all(c["residency"] == "cold" and c["resident_on"] == [] for c in cards.values())
    assert all(c["state"] == "ready" and c["state_reason"] is None for c in cards.values())
    assert all(c["owned_by"] == "aegaeon" for c in cards.values())


async def poll(check, timeout: float = 30.0):
    """Call ``check()`` until it returns something truthy (the gateway hears heartbeats on its
    own subscription: wait for the effect, not for a fixed time); returns the last result."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not (result := await check()) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)
    return result


async def test_models_shows_where_a_model_is_resident(stack):
    await stack.backend.beat("w7", resident="tiny")
    async with httpx.AsyncClient(base_url=stack.base_url) as http:

        async def cards_once_resident():
            cards = {c["id"]: c for c in (await http.get("/v1/models")).json()["data"]}
            return cards if cards["tiny"]["resident_on"] else None

        cards = await poll(cards_once_resident)
    assert cards["tiny"]["residency"] == "resident" and cards["tiny"]["resident_on"] == ["w7"]
    assert cards["cold-one"]["residency"] == "cold"


async def test_a_model_card_carries_its_queue_dtype_and_context(stack):
    await stack.backend.beat("w7", resident="tiny", queued={"tiny": 3}, running={"tiny": 2})
    async with httpx.AsyncClient(base_url=stack.base_url) as http:

        async def card_once_queued():
            card = (await http.get("/v1/models/tiny")).json()
            return card if card["queued"] else None

        card = await poll(card_once_queued)
        cold = (await http.get("/v1/models/cold-one")).json()
    assert (card["queued"], card["running"], card["dtype"]) == (3, 2, "float32")
    assert card["context_length"] == CONTEXT
    assert (cold["queued"], cold["running"]) == (0, 0)


async def test_the_runtime_view_and_its_event_stream_show_what_workers_do(stack):
    bus = stack.backend.bus
    switch = SwitchDone("w7", None, "tiny", 0.01, 1024, prefetched_bytes=4096)
    preemption = TurnDone("w7", 1, "tiny", steps=3, elapsed_s=0.1, swapped_out=["r1"])
    async with (
        httpx.AsyncClient(base_url=stack.base_url, timeout=10) as http,
        http.stream("GET", "/v1/aegaeon/events") as events,
    ):
        lines = aiter(events.aiter_lines())
        assert (await anext(lines)).startswith(": aegaeon events")  # subscribed
        for event in (switch, RequestDone("w7", "r0", "length", 3), preemption):
            await bus.publish(bus.subjects.worker_events("w7"), event)
        streamed = []
        while len(streamed) < 2:
            line = await asyncio.wait_for(anext(lines), 10)
            if line.startswith("data: "):
                streamed.append(json.loads(line.removeprefix("data: ")))
        await stack.backend.beat("w7", resident="tiny", queued={"tiny": 1}, running={"tiny": 2})

        async def view_once_heard():
            view = (await http.get("/v1/aegaeon/runtime")).json()
            return view if view["workers"] and view["scheduler"]["alive"] else None

        view = await poll(view_once_heard)
    assert [e["kind"] for e in streamed] == ["switch", "preemption"]  # a request end is not shown
    assert streamed[0]["to_model"] == "tiny" and streamed[0]["prefetched_bytes"] == 4096
    assert streamed[1]["requests"] == ["r1"]
    assert [w["worker_id"] for w in view["workers"]] == ["w7"]
    registered = {
        "state": "ready",
        "priority": "normal",
        "pin": 0,
        "keep_alive_s": 0.0,
    }  # idle ones are listed too
    assert view["models"] == [
        {"model": "cold-one", **registered, "queued": 0, "running": 0, "resident_on": []},
        {"model": "tiny", **registered, "queued": 1, "running": 2, "resident_on": ["w7"]},
    ]
    assert [e["kind"] for e in view["recent"]] == ["switch", "preemption"]


async def test_a_key_sees_in_the_runtime_view_only_the_models_it_may_use(keyed_stack):
    bus = keyed_stack.backend.bus
    await bus.publish(bus.subjects.worker_events("w7"), SwitchDone("w7", None, "tiny", 0.01, 1))
    await keyed_stack.backend.beat("w7", resident="tiny", queued={"tiny": 1, "cold-one": 2})
    async with httpx.AsyncClient(base_url=keyed_stack.base_url, timeout=10) as http:

        async def view(key: str):
            return (await http.get("/v1/aegaeon/runtime", headers=auth(key))).json()

        async def alices_once_heard():
            seen = await view("sk-alice")
            return seen if seen["recent"] and seen["workers"] and seen["models"] else None

        alice = await poll(alices_once_heard)
        bob = await view("sk-bob")  # may use cold-one only
        anonymous = await http.get("/v1/aegaeon/runtime")
    assert {m["model"] for m in alice["models"]} == {"tiny", "cold-one"}
    assert [m["model"] for m in bob["models"]] == ["cold-one"] and bob["recent"] == []
    assert bob["workers"][0]["resident_model"] is None and alice["workers"][0]["resident_model"] == "tiny"  # fmt: skip
    assert anonymous.status_code == 401


async def test_tokenize_and_detokenize_answer_as_vllm_does(stack, tiny_tokenizer):
    async with httpx.AsyncClient(base_url=stack.base_url) as http:
        prompt = await http.post("/tokenize", json={"model": "tiny", "prompt": "héllo wörld"})
        bare = await http.post("/tokenize", json={"model": "tiny", "prompt": "héllo wörld",
                                                  "add_special_tokens": False})  # fmt: skip
        messages = [{"role": "user", "content": "hi there"}]
        chat = await http.post("/tokenize", json={"model": "tiny", "messages": messages})
        both = await http.post("/tokenize", json={"model": "tiny", "prompt": "x", "messages": messages})  # fmt: skip
        text = await http.post("/detokenize", json={"model": "tiny", "tokens": prompt.json()["tokens"]})  # fmt: skip
        out_of_range = await http.post("/detokenize", json={"model": "tiny", "tokens": [10**9]})
        unknown = await http.post("/tokenize", json={"model": "nope", "prompt": "x"})
    assert prompt.json() == {"count": len(tiny_tokenizer("héllo wörld")["input_ids"]),
                             "max_model_len": CONTEXT,
                             "tokens": tiny_tokenizer("héllo wörld")["input_ids"]}  # fmt: skip
    assert bare.json()["tokens"] == tiny_tokenizer("héllo wörld", add_special_tokens=False)["input_ids"]  # fmt: skip
    rendered = tiny_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)  # fmt: skip
    assert chat.json()["tokens"] == tiny_tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert text.json() == {"prompt": "héllo wörld"}
    assert both.status_code == out_of_range.status_code == 400
    assert unknown.status_code == 404


async def test_health_is_503_until_a_scheduler_and_a_worker_are_seen(stack):
    async with httpx.AsyncClient(base_url=stack.base_url) as http:
        before = await http.get("/health")
        await stack.backend.beat("w1")

        async def healthy():
            response = await http.get("/health")
            return response if response.status_code == 200 else None

        after = await poll(healthy) or await http.get("/health")
    assert before.status_code == 503
    assert set(before.json()["missing"]) == {"scheduler", "worker"}
    assert before.json()["nats"] and before.json()["redis"]
    assert after.status_code == 200 and after.json()["status"] == "ok"
    assert after.json()["workers"] == 1


async def test_health_is_503_until_the_model_registry_has_answered_once(
    nats_server, redis_server, tiny_model
):
    async for stack in serve_stack(
        nats_server, redis_server, tiny_model, "noregistry", backend_started=False
    ):
        await stack.backend.beat("w1")  # a scheduler and a worker, but no model-store yet
        async with httpx.AsyncClient(base_url=stack.base_url) as http:

            async def health_missing(missing: list[str]):
                response = await http.get("/health")
                return response if response.json()["missing"] == missing else None

            before = await poll(lambda: health_missing(["model-store"]))  # the beat was heard
            await stack.backend.start()  # the store answers
            after = await poll(lambda: health_missing([])) or await http.get("/health")
            await stack.backend.stop()  # a later outage: the gateway serves the last list
            still = await http.get("/health")
    assert before is not None and before.status_code == 503 and not before.json()["registry"]
    assert after.status_code == 200 and after.json()["registry"]
    assert still.status_code == 200 and still.json()["registry"]


async def test_health_goes_503_when_heartbeats_stop(stack, monkeypatch):
    from aegaeon.gateway import cluster

    await stack.backend.beat("w1")
    async with httpx.AsyncClient(base_url=stack.base_url) as http:

        async def health_is(status: int, missing: set[str] | None = None):
            response = await http.get("/health")
            if response.status_code != status:
                return None
            if missing is not None and set(response.json().get("missing", [])) != missing:
                return None  # one of the two went stale, the other not yet
            return response

        assert await poll(lambda: health_is(200))  # the heartbeat was heard
        monkeypatch.setattr(cluster, "FRESH_S", 0.01)
        both = {"scheduler", "worker"}
        response = await poll(lambda: health_is(503, both)) or await http.get("/health")
    assert response.status_code == 503
    assert set(response.json()["missing"]) == {"scheduler", "worker"}


async def test_prompt_over_the_configured_token_limit_is_413(nats_server, redis_server, tiny_model):
    async for stack in serve_stack(
        nats_server, redis_server, tiny_model, "plimit", max_prompt_tokens=5
    ):
        async with httpx.AsyncClient(base_url=stack.base_url) as http:
            long = await http.post("/v1/completions", json={**BODY, "prompt": "word " * 20})
            short = await http.post("/v1/completions", json={**BODY, "prompt": "word"})
        assert long.status_code == 413
        assert long.json()["error"]["code"] == "prompt_too_long"
        assert short.status_code == 200
        await stack.settle()
        assert len(stack.backend.submitted) == 1


async def test_one_model_can_be_retrieved_and_an_unknown_one_is_404(stack):
    api = AsyncOpenAI(base_url=stack.base_url + "/v1", api_key="x", max_retries=0)
    card = await api.models.retrieve("cold-one")
    assert card.id == "cold-one" and card.model_dump()["residency"] == "cold"
    with pytest.raises(NotFoundError):
        await api.models.retrieve("nope")
