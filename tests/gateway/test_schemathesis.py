"""Property-based run of the gateway's own OpenAPI schema (schemathesis): for generated valid and
invalid requests to every operation, no 5xx and every response conforms to the schema (status
code, content type, body, headers)."""

from __future__ import annotations

import asyncio
import threading

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from .conftest import serve_stack

pytestmark = pytest.mark.timeout(120)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
EXAMPLES = {GenerationMode.POSITIVE: 25, GenerationMode.NEGATIVE: 15}


class ThreadedStack:
    """The served gateway and fake backend on their own event loop in a thread, so the
    synchronous schemathesis client can call it; workers and scheduler beat every second."""

    def __init__(self, nats_server, redis_server, tiny_model) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.gen = serve_stack(nats_server, redis_server, tiny_model, "schema")
        self.stack = self._run(self.gen.__anext__())
        self.beats = asyncio.run_coroutine_threadsafe(self._beat(), self.loop)

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    async def _beat(self) -> None:
        while True:
            await self.stack.backend.beat("w0", resident="tiny")
            await asyncio.sleep(1.0)

    def close(self) -> None:
        self.beats.cancel()
        with pytest.raises(StopAsyncIteration):
            self._run(self.gen.__anext__())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def live(nats_server, redis_server, tiny_model):
    threaded = ThreadedStack(nats_server, redis_server, tiny_model)
    requests.get(threaded.stack.base_url + "/health", timeout=5)
    yield threaded.stack
    threaded.close()


def with_known_model(strategy):
    """Half of the valid bodies name the registered model, so generation is reached too."""

    def pick(pair):
        case, known = pair
        if known and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = "tiny"
        return case

    return st.tuples(strategy, st.booleans()).map(pick)


@pytest.mark.parametrize("mode", list(EXAMPLES), ids=str)
def test_every_operation_conforms_to_the_schema_and_never_answers_5xx(live, mode, capsys):
    schema = schemathesis.openapi.from_dict(live.app.openapi())
    session = requests.Session()
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions"}
    if mode is GenerationMode.NEGATIVE:
        # Only operations with a body have something to get wrong (GETs take no input).
        operations = [op for op in operations if op.method.lower() == "post"]
    statuses: set[int] = set()
    tried = 0
    for operation in operations:
        strategy = operation.as_strategy(generation_mode=mode)
        if mode is GenerationMode.POSITIVE:
            strategy = with_known_model(strategy)

        @given(case=strategy)
        @settings(
            max_examples=EXAMPLES[mode],
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def run(case):
            nonlocal tried
            tried += 1
            response = case.call(base_url=live.base_url, session=session, timeout=30)
            statuses.add(response.status_code)
            case.validate_response(response, checks=CHECKS)

        run()
    with capsys.disabled():  # the count the hardening issue asks to report
        print(f"\nschemathesis {mode}: {tried} requests to {len(operations)} operations, "
              f"statuses {sorted(statuses)}")  # fmt: skip
    if mode is GenerationMode.NEGATIVE:
        assert statuses and all(400 <= status < 500 for status in statuses), statuses
    assert live.gateway.admission.in_flight == 0


KNOWN_GOOD = {
    "/v1/completions": {"model": "tiny", "prompt": "hello", "max_tokens": 5},
    "/v1/chat/completions": {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 5,
    },
}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path", list(KNOWN_GOOD))
def test_successful_answers_conform_to_the_schema(live, path, stream):
    schema = schemathesis.openapi.from_dict(live.app.openapi())
    case = schema[path]["POST"].Case(body={**KNOWN_GOOD[path], "stream": stream})
    response = case.call(base_url=live.base_url, timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"][0].startswith(
        "text/event-stream" if stream else "application/json"
    )
    case.validate_response(response, checks=CHECKS)
