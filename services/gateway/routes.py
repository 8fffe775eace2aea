"""The HTTP routes: OpenAI's endpoints, /v1/models, vLLM's /tokenize and /detokenize, the
runtime view (/v1/aegaeon/runtime and its event stream), /health. The admin API is
``admin.py``'s."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .auth import ApiKey
from .choices import Choices
from .errors import APIError
from .model_cards import model_card
from .observe import RequestObserver
from .openai_types import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    HealthResponse,
    ModelCard,
    ModelsResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from .prepare import Kind, tokenize
from .runtime_types import RuntimeResponse
from .service import Gateway
from .streaming import SSE_HEADERS, complete, event_stream, stream

bearer = HTTPBearer(auto_error=False, description="An API key (when keys are configured).")

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        400: "Bad input (malformed JSON, wrong types, out of range, unsupported, too long)",
        401: "Missing or invalid API key",
        404: "Unknown model",
        409: "The model is draining or failed to load",
        413: "Body or prompt too large",
        429: "Rate limit reached (Retry-After)",
        500: "The engine failed on this request",
        503: "Overloaded or a dependency is down (Retry-After)",
    }.items()
}
_SSE = {
    "text/event-stream": {
        "schema": {
            "description": "One SSE event: `data` is a JSON chunk object, or `[DONE]` last.",
            "type": "object",
            "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
            "required": ["data"],
        }
    }
}

router = APIRouter()


def gateway(request: Request) -> Gateway:
    return request.app.state.gateway


def caller(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)
) -> ApiKey:
    header = f"Bearer {credentials.credentials}" if credentials else None
    return gateway(request).authenticate(header)


async def _serve(
    request: Request, kind: Kind, body: ChatCompletionRequest | CompletionRequest, key: ApiKey
):
    observer = RequestObserver.start(request, kind, body)
    try:
        with observer.current():  # the submit's NATS headers carry this span
            choices = Choices(await gateway(request).open(kind, body, key))
    except APIError as exc:
        observer.refused(exc.status, exc.message)
        raise
    except BaseException as exc:
        observer.refused(500, type(exc).__name__)
        raise
    observer.watch(choices)  # records latencies as each closes, then ends the span
    if choices.first.p.stream:
        return stream(choices)
    return await complete(request, choices)


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletion,
    responses={**_ERRORS, 200: {"content": _SSE}},
    summary="Create a chat completion (streamed as SSE with stream=true)",
)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, key: ApiKey = Depends(caller)
):
    return await _serve(request, "chat", body, key)


@router.post(
    "/v1/completions",
    response_model=Completion,
    responses={**_ERRORS, 200: {"content": _SSE}},
    summary="Create a text completion (streamed as SSE with stream=true)",
)
async def completions(body: CompletionRequest, request: Request, key: ApiKey = Depends(caller)):
    return await _serve(request, "completion", body, key)


@router.get(
    "/v1/models",
    response_model=ModelsResponse,
    responses={k: v for k, v in _ERRORS.items() if k in (401, 503)},
    summary="Every registered model: its state (loading, ready, draining, failed), residency",
)
async def list_models(request: Request, key: ApiKey = Depends(caller)):
    gw = gateway(request)
    models = sorted(await gw.registry(), key=lambda m: m.name)
    cards = [model_card(m, gw.cluster) for m in models if key.allows(m.name)]
    return JSONResponse({"object": "list", "data": cards})


@router.get(
    "/v1/models/{model}",
    response_model=ModelCard,
    responses={k: v for k, v in _ERRORS.items() if k in (401, 404, 503)},
    summary="One registered model",
)
async def get_model(model: str, request: Request, key: ApiKey = Depends(caller)):
    gw = gateway(request)
    info = await gw.resolve(model, key)
    return JSONResponse(model_card(info, gw.cluster))


@router.post(
    "/tokenize",
    response_model=TokenizeResponse,
    responses={k: v for k, v in _ERRORS.items() if k in (400, 401, 404, 503)},
    summary="A prompt or a chat as the model's token ids (as vLLM's /tokenize)",
)
async def tokenize_route(body: TokenizeRequest, request: Request, key: ApiKey = Depends(caller)):
    gw = gateway(request)
    info = await gw.resolve(body.model, key)
    ids = await tokenize(body, await gw.tokenizer(info))
    return JSONResponse({"count": len(ids), "max_model_len": info.context_length, "tokens": ids})


@router.post(
    "/detokenize",
    response_model=DetokenizeResponse,
    responses={k: v for k, v in _ERRORS.items() if k in (400, 401, 404, 503)},
    summary="Token ids as text (as vLLM's /detokenize)",
)
async def detokenize_route(
    body: DetokenizeRequest, request: Request, key: ApiKey = Depends(caller)
):
    gw = gateway(request)
    tok = await gw.tokenizer(await gw.resolve(body.model, key))
    if any(t < 0 or t >= tok.vocab_size for t in body.tokens):
        raise APIError(400, f"Token ids must be in [0, {tok.vocab_size}).", param="tokens")
    return JSONResponse({"prompt": tok.decode(body.tokens)})


@router.get(
    "/v1/aegaeon/runtime",
    response_model=RuntimeResponse,
    responses={k: v for k, v in _ERRORS.items() if k in (401,)},
    summary="Workers, resident models, queues, the round's α and recent switches",
)
async def runtime(request: Request, key: ApiKey = Depends(caller)):
    gw = gateway(request)
    try:
        registry = await gw.models.all()
    except Exception:  # no model-store reachable: the view without lifecycle states
        registry = []
    return JSONResponse(gw.cluster.runtime(key.allows, registry))


# Not in the schema: the stream never ends (a schema fuzzer would wait on it forever).
@router.get("/v1/aegaeon/events", include_in_schema=False)
async def runtime_events(request: Request, key: ApiKey = Depends(caller)):
    """Switches, preemptions and hand-offs as they happen (of the models this key may use), one
    SSE ``data`` line each (JSON, as in the runtime view's ``recent``), with a comment line
    every 15 s while nothing happens."""
    return StreamingResponse(
        event_stream(request, gateway(request).cluster, key.allows),
        media_type="text/event-stream",
        headers=SSE_HEADERS,
    )


@router.get("/metrics", include_in_schema=False)
async def prometheus_metrics() -> Response:
    """Prometheus exposition of this process's metrics (aegaeon.metrics)."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


@router.get(
    "/health",
    response_model=HealthResponse,
    responses={503: {"model": HealthResponse, "description": "Something is missing"}},
    summary="200 when NATS, Redis, the model registry, a scheduler and a worker are up",
)
async def health(request: Request):
    gw = gateway(request)
    nats_ok = gw.bus.nc.is_connected
    try:
        redis_ok = bool(await gw.redis.ping())
    except Exception:
        redis_ok = False
    scheduler_ok = gw.cluster.scheduler_alive()
    workers = len(gw.cluster.live_workers())
    # Every request resolves its model in the registry first: until the model-store has answered
    # once, a request would get 503 however healthy the rest looks (a stack starting on a busy host).
    registry_ok = await gw.models.known()
    missing = [
        name
        for name, ok in (
            ("nats", nats_ok),
            ("redis", redis_ok),
            ("model-store", registry_ok),
            ("scheduler", scheduler_ok),
            ("worker", workers > 0),
        )
        if not ok
    ]
    body = {
        "status": "unavailable" if missing else "ok",
        "nats": nats_ok,
        "redis": redis_ok,
        "registry": registry_ok,
        "scheduler": scheduler_ok,
        "workers": workers,
        "missing": missing,
    }
    return JSONResponse(body, status_code=503 if missing else 200)
