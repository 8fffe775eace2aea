"""The gateway's share of tracing and metrics: one GenAI span per completion request, and the
latencies a client sees, recorded when the request ends.

The span (``chat demo-llama``) lies under the HTTP server span of the request, in the trace of
the client's ``traceparent`` if it sent one, and is the current span while the request is
submitted, so the scheduler's and workers' spans (carried in NATS headers) join its trace. It
carries the OpenTelemetry GenAI semantic-convention attributes (``gen_ai.*``) and ends when the
response does (after the last SSE chunk).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from fastapi import Request
from opentelemetry import propagate, trace
from opentelemetry.trace import Status, StatusCode

from aegaeon import metrics
from aegaeon.telemetry import tracer

from .openai_types import ChatCompletionRequest, CompletionRequest
from .prepare import Kind

if TYPE_CHECKING:
    from .choices import Choices
    from .generation import Generation

_tracer = tracer(__name__)

OPERATIONS: dict[Kind, str] = {"chat": "chat", "completion": "text_completion"}
"""``gen_ai.operation.name`` of each endpoint kind."""


def request_attributes(kind: Kind, body: ChatCompletionRequest | CompletionRequest) -> dict:
    """The GenAI request attributes known before the request runs (unset ones left out)."""
    max_tokens = body.max_tokens
    if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None:
        max_tokens = body.max_completion_tokens
    values: dict[str, Any] = {
        "gen_ai.operation.name": OPERATIONS[kind],
        "gen_ai.provider.name": "aegaeon",
        "gen_ai.request.model": body.model,
        "gen_ai.request.max_tokens": max_tokens,
        "gen_ai.request.temperature": body.temperature,
        "gen_ai.request.top_p": body.top_p,
        "gen_ai.request.seed": getattr(body, "seed", None),
    }
    return {k: v for k, v in values.items() if v is not None}


class RequestObserver:
    """The span and the metrics of one completion request: ``start``, ``current()`` while
    submitting, then exactly one of ``refused``, or ``watch`` and ``finished`` by each of its
    choices (later calls do nothing).

    The span is the GenAI inference span (``{operation} {model}``), a child of the HTTP server
    span when FastAPI makes one (its built-in telemetry), which gets the same ``gen_ai.request.*``
    attributes (and usage too when it is still open at the end: FastAPI may end it with the last
    byte sent); without one the span continues the client's ``traceparent`` itself. It ends when
    the last choice does; each choice, a request of its own to the engine, records its own
    latencies.
    """

    def __init__(self, span: trace.Span, http_span: trace.Span | None) -> None:
        self.span = span
        self.http_span = http_span
        self.ended = False
        self.choices: Choices | None = None
        self.open: list[Generation] = []  # choices not finished yet

    @classmethod
    def start(
        cls, request: Request, kind: Kind, body: ChatCompletionRequest | CompletionRequest
    ) -> RequestObserver:
        http_span = _http_span(request)
        parent = (
            trace.set_span_in_context(http_span)
            if http_span is not None
            else propagate.extract(dict(request.headers))
        )
        attributes = request_attributes(kind, body)
        span = _tracer.start_span(
            f"{OPERATIONS[kind]} {body.model}", context=parent, attributes=attributes
        )
        if http_span is not None:
            http_span.set_attributes(attributes)
        return cls(span, http_span)

    def _set(self, attributes: dict[str, Any]) -> None:
        for span in (self.span, self.http_span):
            if span is not None and span.is_recording():  # FastAPI's may have ended already
                span.set_attributes(attributes)

    @contextmanager
    def current(self) -> Iterator[None]:
        """This span is the current one inside (so NATS messages sent there carry it)."""
        with trace.use_span(self.span, end_on_exit=False):
            yield

    def refused(self, status: int, message: str) -> None:
        """It ended before it was submitted (no token), with an error answer."""
        if self.ended:
            return
        self.ended = True
        self.span.set_attribute("error.type", str(status))
        self.span.set_status(Status(StatusCode.ERROR, message))
        self.span.end()

    def watch(self, choices: Choices) -> None:
        """The request's choices, submitted: each reports to ``finished`` when it closes."""
        self.choices = choices
        self.open = list(choices.generations)
        for generation in choices.generations:
            generation.observer = self

    def finished(self, generation: Generation) -> None:
        """One choice was submitted and is over (finished, failed or cancelled): its latencies
        in the histograms; once every choice is, usage on the spans and the span's end."""
        if self.ended or generation not in self.open:
            return
        self.open.remove(generation)
        record_latencies(generation, generation.outcome)
        if self.open or self.choices is None:
            return
        self.ended = True
        reasons = [g.outcome for g in self.choices.generations]
        self._set(
            {
                "gen_ai.response.id": generation.p.response_id,
                "gen_ai.response.model": generation.p.model.name,
                "gen_ai.usage.input_tokens": self.choices.prompt_tokens,
                "gen_ai.usage.output_tokens": self.choices.output_tokens,
                "gen_ai.response.finish_reasons": reasons,
            }
        )
        if "error" in reasons:
            self.span.set_status(Status(StatusCode.ERROR, "the engine failed on this request"))
        self.span.end()


def _http_span(request: Request) -> trace.Span | None:
    """FastAPI's own HTTP server span of this request, when its telemetry made one (it keeps
    the span in the ASGI scope; older FastAPI versions make none)."""
    span = getattr(request.scope.get("fastapi.telemetry"), "span", None)
    return span if isinstance(span, trace.Span) and span.is_recording() else None


def record_latencies(generation: Generation, reason: str) -> None:
    """TTFT, TPOT, ITL and e2e as vLLM defines them; success, error and token counters. A request
    the client cancelled counts as finished with reason ``abort`` (operators watch that rate for
    users giving up) and leaves the latency histograms alone."""
    model = generation.p.model.name
    t = generation.timings
    metrics.PROMPT_TOKENS.labels(model).inc(len(generation.p.prompt_ids))
    metrics.GENERATION_TOKENS.labels(model).inc(t.output_tokens)
    if reason == "error":
        if generation.p.stream:  # a non-streamed one was answered with an error, counted there
            metrics.REQUEST_ERRORS.labels("500").inc()
        return
    metrics.REQUEST_SUCCESS.labels(model, reason).inc()
    if reason == "abort":  # latencies of a request cut short would read as fast ones
        return
    if t.first_token is None or not t.token_times:
        return
    metrics.TIME_TO_FIRST_TOKEN.labels(model).observe(t.first_token - t.arrival)
    last = t.token_times[-1]
    metrics.E2E_REQUEST_LATENCY.labels(model).observe(last - t.arrival)
    if t.output_tokens > 1:
        tpot = (last - t.first_token) / (t.output_tokens - 1)
        metrics.TIME_PER_OUTPUT_TOKEN.labels(model).observe(tpot)
    for before, after in zip(t.token_times, t.token_times[1:], strict=False):
        metrics.INTER_TOKEN_LATENCY.labels(model).observe(after - before)
