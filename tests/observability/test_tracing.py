"""One trace per request across gateway, scheduler, gpu-worker and model-store, checked at a real
OTLP/HTTP receiver that the stack's exporters send to."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from .conftest import ObservedStack, cold_models, models_in_no_slot, stream_chat
from .otlp_receiver import SERVER_KIND, SpanRecord

pytestmark = pytest.mark.slow

HTTP_SPAN = "POST /v1/chat/completions"
REQUEST_TREE = {
    HTTP_SPAN,
    "scheduler.submit",
    "aegaeon.queue_wait",
    "aegaeon.dispatch",
    "aegaeon.turn",
    "aegaeon.switch",
    "aegaeon.request.prefill",
    "aegaeon.request.decode_turn",
}


def traced_request(
    observed: ObservedStack,
    model: str,
    max_tokens: int,
    on_first_token: Callable[[], None] | None = None,
) -> tuple[str, str]:
    """Stream one request under a client span of our own; returns (trace id, client span id)."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    headers = {"traceparent": f"00-{trace_id}-{span_id}-01"}
    lines = stream_chat(observed.stack.url, model, max_tokens, headers, on_first_token)
    assert lines[-1] == "[DONE]"
    return trace_id, span_id


def decode_steps(spans: list[SpanRecord]) -> int:
    return sum(
        s.attributes["aegaeon.steps"] for s in spans if s.name == "aegaeon.request.decode_turn"
    )


def swap_directions(spans: list[SpanRecord]) -> set[str]:
    return {s.attributes["aegaeon.kv_swap.direction"] for s in spans if s.name == "aegaeon.kv_swap"}


def only(spans: list[SpanRecord], name: str) -> SpanRecord:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, f"{name}: {len(found)} spans"
    return found[0]


def test_one_trace_holds_the_gateway_scheduler_and_worker_spans_of_a_request(observed):
    model = models_in_no_slot(observed.stack.url)[0]  # its turn must copy it in
    trace_id, client_span = traced_request(observed, model, max_tokens=6)
    # Each service exports on its own schedule: wait for the model-store's span and for the
    # spans of every turn (all 6 tokens' decode-turn spans, a decode turn's dispatch).
    names = {*REQUEST_TREE, f"chat {model}", "model-store.ensure"}
    spans = observed.receiver.wait_until(
        trace_id,
        lambda spans: (
            names <= {s.name for s in spans}
            and decode_steps(spans) >= 6
            and any(
                s.name == "aegaeon.dispatch" and s.attributes["aegaeon.quota_s"] > 0 for s in spans
            )
        ),
    )
    names = {s.name for s in spans}
    assert names >= REQUEST_TREE, REQUEST_TREE - names

    http = only(spans, HTTP_SPAN)
    assert (http.service, http.kind) == ("gateway", SERVER_KIND)
    assert http.parent == client_span  # it continued the client's traceparent
    gateway = only(spans, f"chat {model}")  # the GenAI span, parent of the rest
    assert (gateway.service, gateway.parent) == ("gateway", http.span_id)
    for a in (gateway.attributes, http.attributes):
        assert a["gen_ai.operation.name"] == "chat"
        assert a["gen_ai.request.model"] == model
        assert a["gen_ai.request.max_tokens"] == 6
        assert a["gen_ai.request.temperature"] == 0
    # The HTTP span may end with the last byte sent; usage is known a moment later.
    a = gateway.attributes
    assert a["gen_ai.usage.input_tokens"] > 0
    assert a["gen_ai.usage.output_tokens"] == 6
    assert a["gen_ai.response.finish_reasons"] == ["length"]
    assert a["gen_ai.response.id"].startswith("chatcmpl")

    for name in ("scheduler.submit", "aegaeon.queue_wait"):
        span = only(spans, name)
        assert (span.service, span.parent) == ("scheduler", gateway.span_id), name
    for span in spans:
        if span.name.startswith("aegaeon.request.") or span.name == "aegaeon.dispatch":
            assert span.parent == gateway.span_id, span.name
    dispatches = [s for s in spans if s.name == "aegaeon.dispatch"]
    for dispatch in dispatches:
        assert dispatch.service == "scheduler"
        assert dispatch.attributes["aegaeon.model"] == model
        assert dispatch.attributes["aegaeon.batch_size"] >= 1
    assert any(d.attributes["aegaeon.quota_s"] > 0 for d in dispatches)  # a decode turn
    prefill = only(spans, "aegaeon.request.prefill")
    assert prefill.service == "gpu-worker"

    by_id = {s.span_id: s for s in spans}
    switch = only(spans, "aegaeon.switch")
    turn = by_id[switch.parent]
    assert turn.name == "aegaeon.turn" and turn.service == "gpu-worker"
    assert by_id[turn.parent].name == "aegaeon.dispatch"
    assert switch.attributes["aegaeon.switch.to"] == model
    assert switch.attributes["aegaeon.switch.bytes"] > 0
    assert switch.attributes["aegaeon.switch.ms"] > 0

    decode_turns = [s for s in spans if s.name == "aegaeon.request.decode_turn"]
    assert sum(s.attributes["aegaeon.steps"] for s in decode_turns) == 6
    assert any(s.service == "model-store" for s in spans)  # the cache load the switch waited for


def test_requests_that_share_a_worker_each_trace_their_switches_and_kv_swaps(observed):
    first, second = cold_models(observed.stack.url)[:2]
    # Force the interleaving: the second request arrives while the first is decoding, and each
    # has far more tokens than one turn's quota holds (the stack's SLO caps a round at 0.5 s;
    # 900 tokens take seconds at any speed this suite meets; GPT-2 holds 1024), so the two
    # models must take turns on the one worker, swapping their KV out and back in.
    first_is_decoding = threading.Event()
    with ThreadPoolExecutor(2) as pool:
        jobs = [pool.submit(traced_request, observed, first, 900, first_is_decoding.set)]
        assert first_is_decoding.wait(120)
        jobs.append(pool.submit(traced_request, observed, second, 900))
        traces = [job.result()[0] for job in jobs]
    for trace_id in traces:
        spans = observed.receiver.wait_for(trace_id, REQUEST_TREE)
        assert {s.name for s in spans} >= REQUEST_TREE
    receiver = observed.receiver
    receiver.wait_until(
        traces[1],
        lambda _: (
            {"out", "in"} <= swap_directions(receiver.trace(traces[0]) + receiver.trace(traces[1]))
        ),
    )
    swaps = [s for t in traces for s in receiver.trace(t) if s.name == "aegaeon.kv_swap"]
    directions = {s.attributes["aegaeon.kv_swap.direction"] for s in swaps}
    assert {"out", "in"} <= directions, directions
    for swap in swaps:
        assert swap.service == "gpu-worker"
