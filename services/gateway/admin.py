"""The admin API: deploy, drain and remove models, and set their serving settings (priority
class, pin, keep-alive), while the system serves (admin keys only).

::

    POST   /v1/aegaeon/models  {"name", "path", "priority", "pin"}  ─► models.deploy ─► 202, loading
    POST   /v1/aegaeon/models/{name}/drain                   ─► models.drain  ─► 200, draining
    POST   /v1/aegaeon/models/{name}/priority {"priority"}   ─► models.serving ─► 200
    POST   /v1/aegaeon/models/{name}/pin {"instances"}       ─► models.serving ─► 200
    POST   /v1/aegaeon/models/{name}/keep_alive {"seconds"}  ─► models.serving ─► 200
    DELETE /v1/aegaeon/models/{name}  ─► models.describe: draining or failed, else 409
                                      ─► scheduler.unload: nothing of it queued or running, else
                                         409; the scheduler refuses it and workers evict it
                                      ─► models.remove: folder, host cache, mark ─► 200, absent

The model-store owns the states and checks every move (``aegaeon.lifecycle``); the gateway asks
the scheduler in between because only the scheduler knows what is in flight. Each step can be
asked again: a remove that failed half-way is finished by asking again. Only keys with
``admin = true`` may call these routes (403 otherwise); with access open (no keys file), anyone
who reaches the gateway may.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from aegaeon.lifecycle import LifecycleError, next_state
from aegaeon.protocol import (
    DeployModel,
    DescribeModel,
    DrainModel,
    ModelInfo,
    ModelReply,
    RemoveModel,
    SetServing,
    UnloadModel,
    UnloadReply,
)

from .auth import ApiKey, admin_refusal
from .errors import APIError
from .model_cards import model_card
from .openai_types import (
    DeletedModel,
    DeployModelRequest,
    ErrorResponse,
    KeepAliveRequest,
    ModelCard,
    PinRequest,
    SetPriorityRequest,
)
from .routes import caller, gateway
from .service import Gateway

DEPLOY_TIMEOUT_S = 900.0
"""How long a deploy may take to answer: a ``.gguf`` file is converted before it does."""
ADMIN_TIMEOUT_S = 30.0

CODES = {400: "invalid_model", 404: "model_not_found", 409: "model_state_conflict"}
"""The OpenAI error ``code`` of each status a lifecycle refusal has."""

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        400: "Not a servable model (unreadable, unsupported, too large for the workers' "
        "slots), an unknown priority class, or a pin count or keep-alive out of range",
        401: "Missing or invalid API key",
        403: "The key is not an admin key",
        404: "Unknown model",
        409: "Name taken, or the model's state does not allow it (drain before removing)",
        503: "No model-store or scheduler answers",
    }.items()
}

admin_router = APIRouter()


def admin_caller(key: ApiKey = Depends(caller)) -> ApiKey:
    refusal = admin_refusal(key)
    if refusal is not None:
        raise APIError(403, refusal, code="admin_key_required")
    return key


async def _ask(gw: Gateway, subject: str, message: Any, reply_type: Any, timeout: float, who: str):
    """One request to the model-store or scheduler; none answering is a 503."""
    try:
        return await gw.bus.request(subject, message, reply_type, timeout)
    except NoRespondersError as exc:
        raise APIError(503, f"No {who} is running; try again.", retry_after=1.0) from exc
    except (NatsTimeoutError, TimeoutError) as exc:
        raise APIError(503, f"The {who} did not answer in {timeout:.0f} s.") from exc


def _refused(reply: ModelReply) -> APIError:
    return APIError(reply.status, reply.error, code=CODES.get(reply.status))


async def _store_verb(gw: Gateway, verb: str, message: Any, timeout: float) -> ModelReply:
    reply = await _ask(
        gw, gw.bus.subjects.models(verb), message, ModelReply, timeout, "model-store"
    )
    if reply.error or reply.model is None:
        raise _refused(reply)
    return reply


async def deploy(gw: Gateway, body: DeployModelRequest) -> ModelInfo:
    message = DeployModel(body.path, body.name, body.priority, body.pin)
    reply = await _store_verb(gw, "deploy", message, DEPLOY_TIMEOUT_S)
    assert reply.model is not None
    gw.models.apply(reply.model)
    return reply.model


async def drain(gw: Gateway, name: str) -> ModelInfo:
    reply = await _store_verb(gw, "drain", DrainModel(name), ADMIN_TIMEOUT_S)
    assert reply.model is not None
    gw.models.apply(reply.model)  # this gateway refuses its requests from now on
    return reply.model


async def set_serving(gw: Gateway, settings: SetServing) -> ModelInfo:
    """One model's serving settings changed (those ``settings`` give) by the model-store."""
    reply = await _store_verb(gw, "serving", settings, ADMIN_TIMEOUT_S)
    assert reply.model is not None
    gw.models.apply(reply.model)  # this gateway's cards show it at once
    return reply.model


async def remove(gw: Gateway, name: str) -> str:
    """Describe, unload, remove (see the module's docstring); returns the store's note."""
    subject = gw.bus.subjects.models("describe")
    described = await _ask(gw, subject, DescribeModel(name), ModelReply, ADMIN_TIMEOUT_S, "model-store")  # fmt: skip
    info = described.model  # as the store sees it now, not as this gateway's cache does
    try:
        next_state(name, info.state if info else None, "remove")
    except LifecycleError as exc:
        raise APIError(exc.status, exc.message, code=CODES.get(exc.status)) from None
    subject = gw.bus.subjects.unload_model
    unloaded = await _ask(gw, subject, UnloadModel(name), UnloadReply, ADMIN_TIMEOUT_S, "scheduler")  # fmt: skip
    if not unloaded.unloaded:
        raise APIError(
            409,
            f"The model '{name}' is draining, but {unloaded.queued} queued and "
            f"{unloaded.running} running requests of it have not finished; remove it once "
            "they have.",
            code="model_in_use",
        )
    reply = await _store_verb(gw, "remove", RemoveModel(name), ADMIN_TIMEOUT_S)
    gw.models.forget(name)
    return reply.note


@admin_router.post(
    "/v1/aegaeon/models",
    status_code=202,
    response_model=ModelCard,
    responses={k: v for k, v in _ERRORS.items() if k != 404},
    summary="Deploy a model folder or .gguf file: registered now, loading until cached",
)
async def deploy_model(
    body: DeployModelRequest, request: Request, _key: ApiKey = Depends(admin_caller)
):
    gw = gateway(request)
    info = await deploy(gw, body)
    return JSONResponse(model_card(info, gw.cluster), status_code=202)


@admin_router.post(
    "/v1/aegaeon/models/{name}/drain",
    response_model=ModelCard,
    responses={k: v for k, v in _ERRORS.items() if k != 400},
    summary="Drain a model: no new requests (409), those accepted finish",
)
async def drain_model(name: str, request: Request, _key: ApiKey = Depends(admin_caller)):
    gw = gateway(request)
    return JSONResponse(model_card(await drain(gw, name), gw.cluster))


def _serving_route(setting: str, summary: str):
    """The decorator of ``POST /v1/aegaeon/models/{name}/<setting>``: one serving setting."""
    return admin_router.post(
        f"/v1/aegaeon/models/{{name}}/{setting}",
        response_model=ModelCard,
        responses={k: v for k, v in _ERRORS.items() if k != 409},
        summary=summary,
    )


async def _serving_card(request: Request, settings: SetServing) -> JSONResponse:
    """Set what ``settings`` gives; the model's card as it is now."""
    gw = gateway(request)
    return JSONResponse(model_card(await set_serving(gw, settings), gw.cluster))


@_serving_route("priority", "Set a model's priority class (low, normal, high): the scheduler's policies weigh it")  # fmt: skip
async def set_model_priority(
    name: str, body: SetPriorityRequest, request: Request, _key: ApiKey = Depends(admin_caller)
):
    return await _serving_card(request, SetServing(name, priority=body.priority))


@_serving_route("pin", "Pin a model on N worker instances (0 unpins): the aegaeon policy keeps it resident")  # fmt: skip
async def pin_model(
    name: str, body: PinRequest, request: Request, _key: ApiKey = Depends(admin_caller)
):
    return await _serving_card(request, SetServing(name, pin=body.instances))


@_serving_route("keep_alive", "Evict a model from the workers and host caches once idle this long (0: never)")  # fmt: skip
async def set_model_keep_alive(
    name: str, body: KeepAliveRequest, request: Request, _key: ApiKey = Depends(admin_caller)
):
    return await _serving_card(request, SetServing(name, keep_alive_s=body.seconds))


@admin_router.delete(
    "/v1/aegaeon/models/{name}",
    response_model=DeletedModel,
    responses={k: v for k, v in _ERRORS.items() if k != 400},
    summary="Remove a drained model once nothing of it is queued or running",
)
async def remove_model(name: str, request: Request, _key: ApiKey = Depends(admin_caller)):
    note = await remove(gateway(request), name)
    return JSONResponse({"id": name, "object": "model", "deleted": True, "note": note})
