"""The admin API's key scope (only ``admin = true`` keys; open access allows it), its answers as
the model-store and scheduler give them, and what requests of a model that is not ready get
(503 loading, 409 draining, 404 once removed): the real gateway with the fake backend, whose
store moves models by the real lifecycle rules and refuses every deploy."""

from __future__ import annotations

import json

import httpx
import msgspec
import openai
import pytest
from aegaeon.gateway.auth import ANONYMOUS, ApiKey, KeysFileError, KeyStore, admin_refusal, hash_key

from aegaeon.protocol import ModelChanged

from .conftest import model_info, serve_stack

pytestmark = pytest.mark.timeout(60)

BODY = {"model": "tiny", "prompt": "x", "max_tokens": 3}
ADMIN_CALLS = [  # (method, path, body, what an admin key gets from the fake store, then tiny's)
    ("POST", "/v1/aegaeon/models", {"path": "/models/x"}, 400, ("ready", "normal", 0)),
    ("POST", "/v1/aegaeon/models/tiny/drain", None, 200, ("draining", "normal", 0)),
    ("DELETE", "/v1/aegaeon/models/tiny", None, 409, ("ready", "normal", 0)),  # drain it first
    ("POST", "/v1/aegaeon/models/tiny/priority", {"priority": "high"}, 200, ("ready", "high", 0)),
    ("POST", "/v1/aegaeon/models/tiny/pin", {"instances": 2}, 200, ("ready", "normal", 2)),
]


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# ---------------------------------------------------------------- the scope, pure


def test_only_a_key_marked_admin_may_manage_models() -> None:
    assert admin_refusal(ApiKey("ops", "0" * 64, admin=True)) is None
    refusal = admin_refusal(ApiKey("team-a", "0" * 64))
    assert refusal is not None and "'team-a'" in refusal and "admin = true" in refusal
    assert admin_refusal(ANONYMOUS) is None  # open access: the development default


def test_the_keys_file_reads_admin_as_a_boolean(tmp_path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(f'[[keys]]\nname = "ops"\nsha256 = "{hash_key("k")}"\nadmin = true\n'
                    f'[[keys]]\nname = "user"\nsha256 = "{hash_key("u")}"\n')  # fmt: skip
    keys = {k.name: k for k in KeyStore.load(path).keys}
    assert keys["ops"].admin and not keys["user"].admin
    path.write_text(f'[[keys]]\nsha256 = "{hash_key("k")}"\nadmin = "yes"\n')
    with pytest.raises(KeysFileError, match="admin must be true or false"):
        KeyStore.load(path)


# ---------------------------------------------------------------- the scope, served


@pytest.fixture
async def admin_stack(nats_server, redis_server, tiny_model, tmp_path):
    keys = [{"name": "ops", "sha256": hash_key("sk-ops"), "admin": True},
            {"name": "alice", "sha256": hash_key("sk-alice")}]  # fmt: skip
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": keys}))
    async for s in serve_stack(nats_server, redis_server, tiny_model, "admin", api_keys_file=str(path)):  # fmt: skip
        yield s


@pytest.mark.parametrize(("method", "path", "body", "status", "after"), ADMIN_CALLS)
async def test_a_key_without_admin_gets_403_and_an_admin_key_gets_through(
    admin_stack, method: str, path: str, body, status: int, after: tuple[str, str, int]
) -> None:
    async with httpx.AsyncClient(base_url=admin_stack.base_url) as http:
        user = await http.request(method, path, json=body, headers=auth("sk-alice"))
        nobody = await http.request(method, path, json=body)
        admin = await http.request(method, path, json=body, headers=auth("sk-ops"))
    assert user.status_code == 403
    assert user.json()["error"]["code"] == "admin_key_required"
    assert "'alice' may not manage models" in user.json()["error"]["message"]
    assert nobody.status_code == 401
    assert admin.status_code == status, admin.text  # past the key check: the store's answer
    tiny = admin_stack.backend.models[0]
    assert (tiny.name, tiny.state, tiny.priority, tiny.pin) == ("tiny", *after)


async def test_open_access_allows_the_admin_api_and_a_drained_model_is_removed(stack) -> None:
    async with httpx.AsyncClient(base_url=stack.base_url) as http:
        ready = await http.delete("/v1/aegaeon/models/tiny")
        drained = await http.post("/v1/aegaeon/models/tiny/drain")
        removed = await http.delete("/v1/aegaeon/models/tiny")
        gone = await http.post("/v1/completions", json=BODY)  # at once, not after the TTL
        again = await http.delete("/v1/aegaeon/models/tiny")
        deploy = await http.post("/v1/aegaeon/models", json={"path": "/nowhere", "name": "x"})
    assert ready.status_code == 409 and ready.json()["error"]["code"] == "model_state_conflict"
    assert "drain it first" in ready.json()["error"]["message"]
    assert drained.status_code == 200 and drained.json()["state"] == "draining"
    assert removed.status_code == 200
    assert removed.json() | {"note": ""} == {"id": "tiny", "object": "model", "deleted": True, "note": ""}  # fmt: skip
    assert gone.status_code == 404 and again.status_code == 404
    assert deploy.status_code == 400 and "no config.json" in deploy.json()["error"]["message"]
    assert deploy.json()["error"]["code"] == "invalid_model"


async def test_an_admin_sets_a_class_the_cards_show_and_a_bad_class_or_model_is_refused(
    stack,
) -> None:
    async with httpx.AsyncClient(base_url=stack.base_url) as http:
        before = (await http.get("/v1/models/tiny")).json()
        changed = await http.post("/v1/aegaeon/models/tiny/priority", json={"priority": "high"})
        card = (await http.get("/v1/models/tiny")).json()  # at once: the reply updated the cache
        listed = {c["id"]: c["priority"] for c in (await http.get("/v1/models")).json()["data"]}
        bad = await http.post("/v1/aegaeon/models/tiny/priority", json={"priority": "urgent"})
        missing = await http.post("/v1/aegaeon/models/tiny/priority", json={})
        unknown = await http.post("/v1/aegaeon/models/nope/priority", json={"priority": "low"})
        deploy = await http.post("/v1/aegaeon/models", json={"path": "/x", "priority": "top"})
    assert before["priority"] == "normal"
    assert changed.status_code == 200, changed.text
    assert (changed.json()["id"], changed.json()["priority"], changed.json()["state"]) == ("tiny", "high", "ready")  # fmt: skip
    assert card["priority"] == "high" and listed == {"tiny": "high", "cold-one": "normal"}
    error = bad.json()["error"]
    assert bad.status_code == 400 and error["param"] == "priority"
    assert "'low', 'normal' or 'high'" in error["message"]
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "priority"
    assert unknown.status_code == 404 and unknown.json()["error"]["message"] == "not registered"
    assert deploy.status_code == 400 and deploy.json()["error"]["param"] == "priority"
    assert stack.backend.models[0].priority == "high"  # the refused calls changed nothing


async def test_an_admin_pins_a_model_the_cards_show_and_a_bad_count_or_model_is_refused(
    stack,
) -> None:
    pin = "/v1/aegaeon/models/tiny/pin"
    async with httpx.AsyncClient(base_url=stack.base_url) as http:
        before = (await http.get("/v1/models/tiny")).json()
        pinned = await http.post(pin, json={"instances": 3})
        card = (await http.get("/v1/models/tiny")).json()  # at once: the reply updated the cache
        listed = {c["id"]: c["pin"] for c in (await http.get("/v1/models")).json()["data"]}
        classed = await http.post("/v1/aegaeon/models/tiny/priority", json={"priority": "low"})
        refused = {bad: await http.post(pin, json={"instances": bad}) for bad in (-1, 65, 1.5, "2", True, None)}  # fmt: skip
        missing = await http.post(pin, json={})
        unknown = await http.post("/v1/aegaeon/models/nope/pin", json={"instances": 1})
        deploy = await http.post("/v1/aegaeon/models", json={"path": "/x", "pin": -1})
        unpinned = await http.post(pin, json={"instances": 0})
    assert before["pin"] == 0
    assert pinned.status_code == 200, pinned.text
    assert (pinned.json()["id"], pinned.json()["pin"], pinned.json()["priority"]) == ("tiny", 3, "normal")  # fmt: skip
    assert card["pin"] == 3 and listed == {"tiny": 3, "cold-one": 0}
    assert (classed.json()["priority"], classed.json()["pin"]) == ("low", 3)  # each sets its own
    for bad, answer in refused.items():
        error = answer.json()["error"]
        assert answer.status_code == 400 and error["param"] == "instances", (bad, answer.text)
        assert error["message"].startswith("Invalid value for 'instances': "), error
    assert "greater than or equal to 0" in refused[-1].json()["error"]["message"]
    assert "less than or equal to 64" in refused[65].json()["error"]["message"]
    assert "valid integer" in refused["2"].json()["error"]["message"]
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "instances"
    assert unknown.status_code == 404 and unknown.json()["error"]["message"] == "not registered"
    assert deploy.status_code == 400 and deploy.json()["error"]["param"] == "pin"
    assert unpinned.status_code == 200 and unpinned.json()["pin"] == 0
    assert (stack.backend.models[0].pin, stack.backend.models[0].priority) == (0, "low")


# ---------------------------------------------------------------- requests of a model that moves


async def announce(stack, state: str, removed: bool = False) -> None:
    """The model-store's news that "tiny" moved; the fake store's list says the same."""
    info = msgspec.structs.replace(model_info("tiny", stack.backend.models[0].path), state=state)
    others = [m for m in stack.backend.models if m.name != "tiny"]
    stack.backend.models = others if removed else [info, *others]
    bus = stack.backend.bus
    await bus.publish(bus.subjects.registry_changed, ModelChanged(info, removed=removed))


async def until_status(http: httpx.AsyncClient, status: int) -> httpx.Response:
    for _ in range(200):
        reply = await http.post("/v1/completions", json=BODY)
        if reply.status_code == status:
            return reply
    raise AssertionError(f"never {status}: {reply.status_code} {reply.text}")


async def test_a_draining_models_requests_get_a_409_naming_it_and_no_client_retry(stack) -> None:
    await announce(stack, "draining")
    async with httpx.AsyncClient(base_url=stack.base_url) as http:
        refused = await until_status(http, 409)
        card = (await http.get("/v1/models/tiny")).json()
    error = refused.json()["error"]
    assert error["code"] == "model_draining" and error["param"] == "model"
    assert "'tiny' is draining" in error["message"]
    assert refused.headers["x-should-retry"] == "false"
    assert card["state"] == "draining"
    api = openai.AsyncOpenAI(base_url=stack.base_url + "/v1", api_key="x")  # default retries
    with pytest.raises(openai.ConflictError, match="draining"):
        await api.completions.create(model="tiny", prompt="x", max_tokens=3)
    assert stack.backend.submitted == []  # refused before the scheduler was asked


async def test_a_loading_model_answers_503_with_retry_after_and_a_failed_one_409_with_why(
    stack,
) -> None:
    await announce(stack, "loading")
    async with httpx.AsyncClient(base_url=stack.base_url) as http:
        loading = await until_status(http, 503)
        assert loading.json()["error"]["code"] == "model_loading"
        assert loading.headers["retry-after"] == "1"
        reason = "/dev/shm/aegaeon-up-7/tiny.safetensors: host cache full"  # the store's words
        info = msgspec.structs.replace(stack.backend.models[0], state="failed", state_reason=reason)
        await stack.backend.bus.publish(stack.backend.bus.subjects.registry_changed, ModelChanged(info))  # fmt: skip
        failed = await until_status(http, 409)
        card = (await http.get("/v1/models/tiny")).json()
    # Why, without the node's paths (clients see the file's name only).
    assert "failed to load: tiny.safetensors: host cache full." in failed.json()["error"]["message"]
    assert (card["state"], card["state_reason"]) == ("failed", "tiny.safetensors: host cache full")


async def test_a_removed_model_is_the_unknown_model_404_and_its_tokenizer_goes(stack) -> None:
    async with httpx.AsyncClient(base_url=stack.base_url) as http:
        assert (await http.post("/v1/completions", json=BODY)).status_code == 200
        assert "tiny" in stack.gateway._tokenizers._loaded
        await announce(stack, "draining", removed=True)
        gone = await until_status(http, 404)
        listed = [c["id"] for c in (await http.get("/v1/models")).json()["data"]]
    assert gone.json()["error"]["code"] == "model_not_found" and "tiny" not in listed
    assert "tiny" not in stack.gateway._tokenizers._loaded  # one deployed again loads its own
