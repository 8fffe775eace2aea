"""The HTTP routes: OpenAI's endpoints, /v1/models and /health."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from aegaeon.protocol import ModelInfo

from .auth import ApiKey
from .errors import APIError
from .observe import RequestObserver
from .openai_types import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
    HealthResponse,
    ModelCard,
    ModelsResponse,
)
from .prepare import Kind
from .service import Gateway
from .streaming import complete, stream

bearer = HTTPBearer(auto_error=False, description="An API key (when keys are configured).")

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        400: "Bad input (malformed JSON, wrong types, out of range, unsupported, too long)",
        401: "Missing or invalid API key",
        404: "Unknown model",
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
            generation = await gateway(request).open(kind, body, key)
    except APIError as exc:
        observer.refused(exc.status, exc.message)
        raise
    except BaseException as exc:
        observer.refused(500, type(exc).__name__)
        raise
    generation.observer = observer  # ends the span and records latencies on close()
    if generation.p.stream:
        return stream(generation)
    return await complete(request, generation)


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


def _card(info: ModelInfo, where: dict[str, list[str]]) -> dict[str, Any]:
    workers = where.get(info.name, [])
    return {
        "id": info.name,
        "object": "model",
        "created": info.created or int(time.time()),
        "owned_by": "aegaeon",
        "state": "resident" if workers else "cold",
        "resident_on": workers,
        "context_length": info.context_length,
        "cached": info.cached,
    }


@router.get(
    "/v1/models",
    response_model=ModelsResponse,
    responses={k: v for k, v in _ERRORS.items() if k in (401, 503)},
    summary="Every registered model, resident or cold",
)
async def list_models(request: Request, key: ApiKey = Depends(caller)):
    gw = gateway(request)
    models = sorted(await gw.registry(), key=lambda m: m.name)
    where = gw.cluster.residency()
    cards = [_card(m, where) for m in models if key.allows(m.name)]
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
    return JSONResponse(_card(info, gw.cluster.residency()))


@router.get("/metrics", include_in_schema=False)
async def prometheus_metrics() -> Response:
    """Prometheus exposition of this process's metrics (aegaeon.metrics)."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


@router.get(
    "/health",
    response_model=HealthResponse,
    responses={503: {"model": HealthResponse, "description": "Something is missing"}},
    summary="200 when NATS, Redis, a scheduler and a worker are up",
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
    missing = [
        name
        for name, ok in (
            ("nats", nats_ok),
            ("redis", redis_ok),
            ("scheduler", scheduler_ok),
            ("worker", workers > 0),
        )
        if not ok
    ]
    body = {
        "status": "unavailable" if missing else "ok",
        "nats": nats_ok,
        "redis": redis_ok,
        "scheduler": scheduler_ok,
        "workers": workers,
        "missing": missing,
    }
    return JSONResponse(body, status_code=503 if missing else 200)
