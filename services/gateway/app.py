"""``create_app(settings)``: the FastAPI application with its lifespan, limits and handlers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .admin import admin_router
from .errors import APIError, install_handlers
from .limits import OVERLOADED
from .routes import router
from .service import Gateway
from .settings import GatewaySettings


def create_app(settings: GatewaySettings | None = None, gateway: Gateway | None = None) -> FastAPI:
    """The gateway's ASGI app. Its lifespan connects to NATS and Redis (``gateway.start()``)."""
    settings = settings or GatewaySettings()
    gw = gateway or Gateway(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await gw.start()
        try:
            yield
        finally:
            await gw.stop()

    app = FastAPI(
        title="Aegaeon",
        version="0.1.0",
        description="OpenAI-compatible API serving many models on few accelerators.",
        lifespan=lifespan,
    )
    app.state.gateway = gw
    app.state.settings = settings
    install_handlers(app)
    app.include_router(router)
    app.include_router(admin_router)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    # Added last, so outermost: a refused request costs no body read.
    retry_after = gw.admission.retry_after_s
    app.add_middleware(RequestLimit, limit=settings.max_requests, retry_after_s=retry_after)
    _drop_422_from_schema(app)
    return app


PROBES = ("/health", "/metrics")
"""Paths the request limit never refuses: cheap, body-less, and what an orchestrator probes; a
gateway that is full but working must not be restarted as dead (infra/k8s/gateway.yaml's liveness
probe reads /metrics) or dropped from its Service while it still streams."""


class RequestLimit:
    """503 for an HTTP request that arrives while ``limit`` are in progress, answered at once
    as admission answers (OpenAI's error body, Retry-After) with ``Connection: close``.

    It bounds what a request costs before admission counts it (a body buffered by BodyLimit,
    validation, tokenization) and what admission never counts (health, metrics, model lists).
    It counts requests, not connections: an idle keep-alive connection holds no slot, so a
    client pool's idle connections cannot turn requests away. (uvicorn's ``limit_concurrency``
    counted them and answered in plain text, without Retry-After; main.py leaves it unset.)
    A refused connection is closed, so a flood does not keep its connections either.
    """

    def __init__(self, app: ASGIApp, limit: int, retry_after_s: float) -> None:
        self.app = app
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.active = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in PROBES:
            await self.app(scope, receive, send)
            return
        if self.active >= self.limit:
            await self._refuse(scope, receive, send)
            return
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = APIError(503, OVERLOADED, retry_after=self.retry_after_s).response()
        response.headers["connection"] = "close"
        await response(scope, receive, send)


class BodyLimit:
    """413 for a body over ``max_bytes``, by Content-Length or while it streams in (chunked)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(scope, receive, send)
            return
        messages, size = [], 0
        while True:  # buffer the (bounded) body so it can be measured before the app runs
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(messages, receive), send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = APIError(413, f"Request body too large: at most {self.max_bytes} bytes.")
        await error.response()(scope, receive, send)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()

    return replayed


def _drop_422_from_schema(app: FastAPI) -> None:
    """Validation errors answer 400 (errors.py); the schema must say so, not FastAPI's 422."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
