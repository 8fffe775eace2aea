"""``create_app(settings)``: the FastAPI application with its lifespan, limits and handlers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .admin import admin_router
from .errors import APIError, install_handlers
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
    _drop_422_from_schema(app)
    return app


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
