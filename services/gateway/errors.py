"""OpenAI-shaped errors and the handlers that make every failure one (DESIGN.md §9).

Body: ``{"error": {"message", "type", "param", "code"}}``. Bad input is 400 (FastAPI's 422 and
malformed JSON included), 401 no/invalid key, 403 model not allowed for the key (or the admin
API for a key without ``admin``), 404 unknown model, 409 a conflict with a model's lifecycle
state (draining or failed; a name taken; a removal with requests in flight), 413 too long, 429 rate limit and 503 overload (both with Retry-After). A 409 carries
``x-should-retry: false``: OpenAI's clients retry a 409 on their own, and no retry can succeed
until an operator acts. An unexpected fault is a 500 with a generic message: the stack trace
goes to the log, never to the client.
"""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from aegaeon import metrics

log = logging.getLogger(__name__)

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "overloaded_error",
}


class APIError(Exception):
    """An error to answer with: HTTP status and OpenAI error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.retry_after = retry_after

    @property
    def type(self) -> str:
        return ERROR_TYPES.get(self.status, "invalid_request_error")

    def body(self) -> dict:
        """The JSON object a client sees (also used as an SSE error chunk)."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def headers(self) -> dict[str, str]:
        headers = {"x-should-retry": "false"} if self.status == 409 else {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        return headers

    def response(self) -> JSONResponse:
        # Every error answer passes here (handlers, the body limit), so it is counted here.
        metrics.REQUEST_ERRORS.labels(str(self.status)).inc()
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers())


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def validation_error(exc: RequestValidationError, content_type: str = "application/json") -> APIError:  # fmt: skip
    """FastAPI's validation report → one 400 naming the first bad field. A body sent with another
    content type than JSON is not parsed at all (``curl -d`` sends a form type unless told):
    say so, instead of the validator's words about the unparsed bytes."""
    errors = exc.errors()
    if not errors:
        return bad_request("Invalid request.")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return bad_request("We could not parse the JSON body of your request.", code="invalid_json")
    mime = content_type.split(";")[0].strip().lower()
    if tuple(first.get("loc", ())) == ("body",) and not _is_json(mime):
        return bad_request(
            f"The request body must be JSON sent with 'Content-Type: application/json' "
            f"(it came as {mime!r}).",
            code="invalid_content_type",
        )
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    message = str(first.get("msg", "Invalid value"))
    if param:
        message = f"Invalid value for '{param}': {message}"
    return bad_request(message, param=param, code="invalid_value")


def _is_json(mime: str) -> bool:
    return mime == "application/json" or mime.endswith("+json")


def install_handlers(app: FastAPI) -> None:
    """Route every exception through the OpenAI error shape."""

    @app.exception_handler(APIError)
    async def on_api_error(_request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        content_type = request.headers.get("content-type", "application/json")
        return validation_error(exc, content_type).response()

    @app.exception_handler(StarletteHTTPException)
    async def on_http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail) if exc.detail else "Request failed."
        return APIError(exc.status_code, message).response()

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return APIError(500, "The server had an error while processing your request.").response()
