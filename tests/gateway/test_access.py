"""Keys (401, allow-lists), rate limits (429), admission (503), /v1/models and /health, served."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from aegaeon.gateway.auth import hash_key
from openai import AsyncOpenAI, AuthenticationError, NotFoundError

from .conftest import serve_stack
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
        keyed_stack.backend.script = Script(text="Hi")
        small = {"model": "tiny", "prompt": "x", "max_tokens": 5}
        third = await http.post("/v1/completions", json=small, headers=auth("sk-carol"))
        fourth = await http.post("/v1/completions", json=small, headers=auth("sk-carol"))
    # "Hi" is short: the third request used few of its 5 tokens and got the rest back.
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
    assert all(c["state"] == "cold" and c["resident_on"] == [] for c in cards.values())
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
    assert cards["tiny"]["state"] == "resident" and cards["tiny"]["resident_on"] == ["w7"]
    assert cards["cold-one"]["state"] == "cold"


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
    assert card.id == "cold-one" and card.model_dump()["state"] == "cold"
    with pytest.raises(NotFoundError):
        await api.models.retrieve("nope")
