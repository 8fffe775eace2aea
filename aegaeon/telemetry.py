"""OpenTelemetry tracing for every service, configured by the standard ``OTEL_*`` variables.

With ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) set, spans go to
that OTLP/HTTP receiver; without it they are still created, so trace context keeps flowing through
NATS headers and a later hop that does export still joins the same trace.

One trace per HTTP request; the spans of its tree and where they are made::

    POST /v1/chat/completions            gateway   (FastAPI's HTTP server span)
    └─ chat <model>                      gateway   (GenAI attributes: model, usage, finish reasons)
       ├─ scheduler.submit               scheduler (admission)
       ├─ aegaeon.queue_wait             scheduler (submit → first dispatch)
       ├─ aegaeon.dispatch  × turns      scheduler (RunTurn sent: model, quota, batch size)
       │  └─ aegaeon.turn                worker    (only under the batch's first request;
       │     ├─ model-store.ensure       store      the other requests link to it)
       │     ├─ aegaeon.switch           worker    (from, to, bytes, ms)
       │     └─ aegaeon.kv_swap          worker    (the batch's KV to the host pool)
       ├─ aegaeon.request.prefill        worker    (the step that made its first token here)
       ├─ aegaeon.request.decode_turn    worker    (its steps in one turn; links to the turn)
       └─ aegaeon.kv_swap                worker    (this request's KV out / back in)

A turn serves many requests from different traces, so the worker keeps each request's context
(from the NATS headers of its AssignRequest) and gives it its own spans.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

_provider: TracerProvider | None = None


def setup_tracing(service_name: str) -> TracerProvider:
    """Install the process-wide tracer provider once (idempotent)."""
    global _provider
    if _provider is not None:
        return _provider
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
    provider = TracerProvider(resource=resource)
    exporter_wanted = os.environ.get("OTEL_TRACES_EXPORTER", "otlp") != "none"
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if exporter_wanted and endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _provider = provider
    return provider


def shutdown_tracing() -> None:
    """Flush spans still buffered (call at service exit)."""
    if _provider is not None:
        _provider.shutdown()


def tracer(name: str) -> trace.Tracer:
    """A tracer for one module."""
    return trace.get_tracer(name)


Attributes = Mapping[str, str | bool | int | float | Sequence[str] | Sequence[int]]


def record_span(
    name: str,
    context: otel_context.Context | None,
    start_ns: int,
    end_ns: int,
    attributes: Attributes | None = None,
    links: Sequence[trace.Link] = (),
) -> trace.Span:
    """A finished span over ``[start_ns, end_ns]`` (``time.time_ns()``) under ``context``: for
    intervals known only once they are over (a queue wait, one request's share of a turn)."""
    span = trace.get_tracer(__name__).start_span(
        name, context=context, start_time=start_ns, attributes=attributes, links=links
    )
    span.end(end_time=end_ns)
    return span


def link_to(context: otel_context.Context | None) -> list[trace.Link]:
    """A link to the span active in ``context`` (none when it carries no valid span)."""
    if context is None:
        return []
    span_context = trace.get_current_span(context).get_span_context()
    return [trace.Link(span_context)] if span_context.is_valid else []


@dataclass
class RequestTrace:
    """Where one request's spans go: the context its message carried, and since when."""

    context: otel_context.Context
    since_ns: int = field(default_factory=time.time_ns)
    open: bool = True  # the interval that started at ``since_ns`` has not been recorded yet


NO_TRACE = otel_context.Context()
"""An empty context: a message published with it carries no trace (it acts for no one request)."""
