"""Conversations through a model's chat template: one the template refuses is the client's
mistake (400 with the template's words), and the ``developer`` role renders as ``system``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import jinja2
import openai
import pytest
from aegaeon.gateway.tokenization import load_tokenizer

from .conftest import serve_stack
from .tokenizer_factory import CHAT_TEMPLATE

pytestmark = pytest.mark.timeout(60)

NO_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
"""Gemma's habit: a template that refuses a system message."""


def with_template(tiny_model: Path, folder: Path, template: str) -> Path:
    """A copy of the tiny model whose tokenizer has another chat template."""
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture
async def no_system_stack(nats_server, redis_server, tiny_model, tmp_path):
    folder = with_template(tiny_model, tmp_path / "no-system", NO_SYSTEM_TEMPLATE)
    async for stack in serve_stack(nats_server, redis_server, folder, "nosys"):
        yield stack


SYSTEM_FIRST = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi"},
]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/tokenize"])
async def test_a_conversation_the_template_refuses_is_a_400_with_the_templates_words(
    no_system_stack, path
):
    body = {"model": "tiny", "messages": SYSTEM_FIRST, "max_tokens": 3}
    async with httpx.AsyncClient(base_url=no_system_stack.base_url) as http:
        response = await http.post(path, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "messages"
    assert "System role not supported" in error["message"]
    await no_system_stack.settle()
    assert no_system_stack.backend.submitted == []
    assert await no_system_stack.request_keys() == []


async def test_the_openai_client_sees_a_bad_request_error_not_a_server_error(no_system_stack):
    api = openai.AsyncOpenAI(base_url=no_system_stack.base_url + "/v1", api_key="unused")
    with pytest.raises(openai.BadRequestError, match="System role not supported"):
        await api.chat.completions.create(model="tiny", messages=SYSTEM_FIRST, max_tokens=3)
    user_only = [{"role": "user", "content": "hi"}]
    reply = await api.chat.completions.create(model="tiny", messages=user_only, max_tokens=3)
    assert reply.choices[0].message.content
    assert len(no_system_stack.backend.submitted) == 1


async def test_a_developer_message_reaches_the_template_as_a_system_message(stack, tiny_tokenizer):
    developer = [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}]
    async with httpx.AsyncClient(base_url=stack.base_url) as http:
        as_developer = await http.post("/tokenize", json={"model": "tiny", "messages": developer})
        as_system = await http.post("/tokenize", json={"model": "tiny", "messages": SYSTEM_FIRST})
        chat = await http.post(
            "/v1/chat/completions", json={"model": "tiny", "messages": developer, "max_tokens": 2}
        )
    assert as_developer.status_code == 200 and chat.status_code == 200
    rendered = tiny_tokenizer.decode(as_developer.json()["tokens"])
    assert rendered == "<|system|>be brief\n<|user|>hi\n<|assistant|>"
    assert as_developer.json()["tokens"] == as_system.json()["tokens"]
    assert stack.backend.submitted[-1].prompt_token_ids == as_system.json()["tokens"]


def test_a_broken_template_is_not_blamed_on_the_conversation(tiny_model, tmp_path):
    """A template that does not parse is the model's fault (a 500, logged), not a refusal."""
    from aegaeon.gateway.tokenization import TemplateRefusal

    broken = with_template(tiny_model, tmp_path / "broken", CHAT_TEMPLATE + "{% if %}")
    with pytest.raises(jinja2.TemplateSyntaxError):
        load_tokenizer(broken).encode_chat([{"role": "user", "content": "hi"}])
    refusing = with_template(tiny_model, tmp_path / "refusing", NO_SYSTEM_TEMPLATE)
    with pytest.raises(TemplateRefusal, match="System role not supported"):
        load_tokenizer(refusing).encode_chat(SYSTEM_FIRST)
