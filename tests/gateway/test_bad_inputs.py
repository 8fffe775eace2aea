"""Every bad input gets the right status, an OpenAI error object, and leaves nothing in Redis
and nothing at the scheduler."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from .conftest import CONTEXT

pytestmark = pytest.mark.timeout(60)

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MESSAGES = [{"role": "user", "content": "hi"}]

CASES = [
    # (name, path, json body or raw bytes, status, param or None)
    ("malformed json", CHAT, b'{"model": "tiny", "messages": [', 400, None),
    ("json that is not an object", CHAT, b"[1, 2]", 400, None),
    ("missing messages", CHAT, {"model": "tiny"}, 400, "messages"),
    ("empty messages", CHAT, {"model": "tiny", "messages": []}, 400, "messages"),
    ("model of wrong type", CHAT, {"model": 5, "messages": MESSAGES}, 400, "model"),
    (
        "string for a number",
        COMPLETIONS,
        {"model": "tiny", "prompt": "x", "max_tokens": "5"},
        400,
        "max_tokens",
    ),
    ("int for a bool", COMPLETIONS, {"model": "tiny", "prompt": "x", "stream": 1}, 400, "stream"),
    (
        "bad role",
        CHAT,
        {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]},
        400,
        None,
    ),
    ("unknown model", CHAT, {"model": "nope", "messages": MESSAGES}, 404, "model"),
    (
        "max_tokens zero",
        COMPLETIONS,
        {"model": "tiny", "prompt": "x", "max_tokens": 0},
        400,
        "max_tokens",
    ),
    (
        "max_tokens negative",
        CHAT,
        {"model": "tiny", "messages": MESSAGES, "max_tokens": -1},
        400,
        "max_tokens",
    ),
    (
        "max_tokens past context",
        COMPLETIONS,
        {"model": "tiny", "prompt": "x", "max_tokens": CONTEXT},
        400,
        "max_tokens",
    ),
    (
        "prompt longer than context",
        COMPLETIONS,
        {"model": "tiny", "prompt": "word " * 400},
        400,
        "prompt",
    ),
    (
        "chat longer than context",
        CHAT,
        {"model": "tiny", "messages": [{"role": "user", "content": "word " * 400}]},
        400,
        "messages",
    ),
    ("n past the most choices", CHAT, {"model": "tiny", "messages": MESSAGES, "n": 17}, 400, "n"),
    (
        "best_of greater than one",
        COMPLETIONS,
        {"model": "tiny", "prompt": "x", "best_of": 3},
        400,
        "best_of",
    ),
    (
        "temperature too high",
        CHAT,
        {"model": "tiny", "messages": MESSAGES, "temperature": 3},
        400,
        "temperature",
    ),
    ("top_p above one", CHAT, {"model": "tiny", "messages": MESSAGES, "top_p": 1.5}, 400, "top_p"),
    (
        "penalty out of range",
        CHAT,
        {"model": "tiny", "messages": MESSAGES, "presence_penalty": 9},
        400,
        "presence_penalty",
    ),
    (
        "tools unsupported",
        CHAT,
        {"model": "tiny", "messages": MESSAGES, "tools": [{"type": "function"}]},
        400,
        "tools",
    ),
    (
        "legacy functions unsupported",
        CHAT,
        {"model": "tiny", "messages": MESSAGES, "functions": [{"name": "f", "parameters": {}}]},
        400,
        "functions",
    ),
    (
        "legacy function_call naming a function",
        CHAT,
        {"model": "tiny", "messages": MESSAGES, "function_call": {"name": "f"}},
        400,
        "function_call",
    ),
    (
        "tool_choice required",
        CHAT,
        {"model": "tiny", "messages": MESSAGES, "tool_choice": "required"},
        400,
        "tool_choice",
    ),
    (
        "tool_choice naming a function",
        CHAT,
        {
            "model": "tiny",
            "messages": MESSAGES,
            "tool_choice": {"type": "function", "function": {"name": "f"}},
        },
        400,
        "tool_choice",
    ),
    (
        "top_logprobs without logprobs",
        CHAT,
        {"model": "tiny", "messages": MESSAGES, "top_logprobs": 2},
        400,
        "top_logprobs",
    ),
    (
        "top_logprobs with logprobs false",
        CHAT,
        {"model": "tiny", "messages": MESSAGES, "logprobs": False, "top_logprobs": 0},
        400,
        "top_logprobs",
    ),
    (
        "stream_options without stream",
        CHAT,
        {"model": "tiny", "messages": MESSAGES, "stream_options": {"include_usage": True}},
        400,
        "stream_options",
    ),
    (
        "stream_options with stream false",
        COMPLETIONS,
        {"model": "tiny", "prompt": "x", "stream": False, "stream_options": {}},
        400,
        "stream_options",
    ),
    (
        "an image content part",
        CHAT,
        {
            "model": "tiny",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this?"},
                        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                    ],
                }
            ],
        },
        400,
        "messages.0.content",
    ),
    (
        "logit_bias key not a token id",
        CHAT,
        {"model": "tiny", "messages": MESSAGES, "logit_bias": {"hello": 5}},
        400,
        "logit_bias",
    ),
    (
        "logit_bias key past the vocabulary",
        CHAT,
        {"model": "tiny", "messages": MESSAGES, "logit_bias": {"99999999": 5}},
        400,
        "logit_bias",
    ),
    (
        "logit_bias value past 100",
        CHAT,
        {"model": "tiny", "messages": MESSAGES, "logit_bias": {"1": 150}},
        400,
        "logit_bias",
    ),
    ("echo unsupported", COMPLETIONS, {"model": "tiny", "prompt": "x", "echo": True}, 400, "echo"),
    (
        "token id out of vocabulary",
        COMPLETIONS,
        {"model": "tiny", "prompt": [1, 10**9]},
        400,
        "prompt",
    ),
    ("negative token id", COMPLETIONS, {"model": "tiny", "prompt": [-1]}, 400, "prompt"),
    (
        "an empty prompt in a batch",
        COMPLETIONS,
        {"model": "tiny", "prompt": ["a", ""]},
        400,
        "prompt",
    ),
    (
        "an empty token list in a batch",
        COMPLETIONS,
        {"model": "tiny", "prompt": [[5], []]},
        400,
        "prompt",
    ),
    ("empty token prompt", COMPLETIONS, {"model": "tiny", "prompt": []}, 400, "prompt"),
    (
        "too many stop strings",
        COMPLETIONS,
        {"model": "tiny", "prompt": "x", "stop": ["a"] * 20},
        400,
        "stop",
    ),
    (
        "top_logprobs too many",
        CHAT,
        {"model": "tiny", "messages": MESSAGES, "logprobs": True, "top_logprobs": 50},
        400,
        "top_logprobs",
    ),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
async def test_bad_input_gets_an_openai_error_and_leaves_nothing(stack, path, body, status, param):
    async with httpx.AsyncClient(base_url=stack.base_url) as http:
        if isinstance(body, bytes):
            response = await http.post(
                path, content=body, headers={"content-type": "application/json"}
            )
        else:
            response = await http.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param or error["param"].startswith(param)
    await stack.settle()
    assert await stack.request_keys() == []
    assert stack.backend.submitted == []


async def test_a_content_part_that_is_not_text_is_told_only_text_is_supported(stack):
    audio = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    messages = [{"role": "user", "content": "hi"}, {"role": "user", "content": [audio]}]
    async with httpx.AsyncClient(base_url=stack.base_url) as http:
        chat = await http.post(CHAT, json={"model": "tiny", "messages": messages})
        tokenize = await http.post("/tokenize", json={"model": "tiny", "messages": messages})
    for response in (chat, tokenize):
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "messages.1.content"
        assert error["message"] == (
            "Invalid value for 'messages.1.content': Only text content parts are supported "
            "(part 0 has type 'input_audio')."
        )
    assert stack.backend.submitted == []


@pytest.mark.parametrize("choice", ["none", "auto"])
async def test_a_tool_choice_that_asks_for_no_call_is_served(stack, choice):
    """Without tools (refused), ``none`` and ``auto`` both choose no call: what is served."""
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 2, "tool_choice": choice,
            "function_call": choice, "functions": [], "tools": []}  # fmt: skip
    async with httpx.AsyncClient(base_url=stack.base_url) as http:
        response = await http.post(CHAT, json=body)
    assert response.status_code == 200, response.text


async def test_prompt_too_long_code_is_context_length_exceeded(stack):
    async with httpx.AsyncClient(base_url=stack.base_url) as http:
        response = await http.post(COMPLETIONS, json={"model": "tiny", "prompt": "word " * 400})
    assert response.json()["error"]["code"] == "context_length_exceeded"


async def test_body_over_the_limit_is_413(stack):
    limit = stack.gateway.settings.max_body_bytes
    body = {"model": "tiny", "prompt": "x" * (limit + 10)}
    async with httpx.AsyncClient(base_url=stack.base_url) as http:
        response = await http.post(COMPLETIONS, json=body)
        assert response.status_code == 413
        assert response.json()["error"]["type"] == "invalid_request_error"

        async def chunks():
            for _ in range(limit // 65536 + 2):
                yield b" " * 65536

        chunked = await http.post(
            COMPLETIONS, content=chunks(), headers={"content-type": "application/json"}
        )
        assert chunked.status_code == 413
    assert stack.backend.submitted == []


async def test_unknown_route_and_wrong_method_are_openai_errors(stack):
    async with httpx.AsyncClient(base_url=stack.base_url) as http:
        missing = await http.get("/v1/nothing")
        wrong = await http.get(COMPLETIONS)
    assert missing.status_code == 404 and "error" in missing.json()
    assert wrong.status_code == 405 and "error" in wrong.json()


async def test_no_scheduler_answering_is_503_with_retry_after(stack):
    await stack.backend.stop()  # nobody answers requests.submit any more
    # The gateway keeps asking for the whole submit timeout (a restarting scheduler comes back).
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as http:
        response = await http.post(COMPLETIONS, json={"model": "tiny", "prompt": "x"})
    # The model directory still knows "tiny" from its cache only if fetched before; either way
    # the answer is a 503 with Retry-After and nothing left behind.
    assert response.status_code == 503
    assert "retry-after" in response.headers
    await stack.settle()
    assert await stack.request_keys() == []


async def test_a_scheduler_that_comes_back_within_the_submit_timeout_serves_the_request(stack):
    await stack.backend.stop()  # a scheduler restarting: nobody answers for a moment

    async def come_back() -> None:
        await asyncio.sleep(0.5)
        await stack.backend.start()

    returning = asyncio.create_task(come_back())
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as http:
        response = await http.post(
            COMPLETIONS, json={"model": "tiny", "prompt": "x", "max_tokens": 2}
        )
    await returning
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS, "/tokenize"])
async def test_a_json_body_sent_as_a_form_is_told_to_send_json(stack, path):
    """``curl -d '{…}'`` without a header sends a form type, and FastAPI then parses nothing."""
    body = b'{"model": "tiny", "prompt": "x", "messages": [{"role": "user", "content": "x"}]}'
    form = {"content-type": "application/x-www-form-urlencoded"}
    async with httpx.AsyncClient(base_url=stack.base_url) as http:
        response = await http.post(path, content=body, headers=form)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_content_type"
    assert "Content-Type: application/json" in error["message"]
    assert "application/x-www-form-urlencoded" in error["message"]
    await stack.settle()
    assert stack.backend.submitted == []


async def test_empty_prompt_is_400(stack):
    async with httpx.AsyncClient(base_url=stack.base_url) as http:
        response = await http.post(COMPLETIONS, json={"model": "tiny", "prompt": ""})
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
    assert stack.backend.submitted == []


async def test_submit_without_answer_is_503_and_cancels_in_case_it_was_taken(
    nats_server, redis_server, tiny_model
):
    from .conftest import serve_stack
    from .fake_backend import Script

    async for stack in serve_stack(
        nats_server, redis_server, tiny_model, "silent", submit_timeout_s=0.3
    ):
        stack.backend.script = Script(silent=True)
        async with httpx.AsyncClient(base_url=stack.base_url) as http:
            response = await http.post(COMPLETIONS, json={"model": "tiny", "prompt": "x"})
        assert response.status_code == 503 and "retry-after" in response.headers
        await stack.settle()
        rid = stack.backend.submitted[-1].request_id
        await stack.backend.cancels_of(rid)
        assert [c.request_id for c in stack.backend.cancelled] == [rid]
        assert await stack.request_keys() == []
