"""``aegaeon models deploy|drain|remove|priority|pin|keep-alive``: the gateway's admin API from
the command line.

It speaks HTTP to a gateway (``--gateway``, by default the local ``aegaeon up`` one, as
``aegaeon top`` does) with ``--api-key`` (default ``$AEGAEON_API_KEY``): a key with
``admin = true`` when the gateway has keys. ``deploy`` sends an absolute path, read on the
model-store's machine (the same one under ``aegaeon up``); ``--wait`` polls the model until its
load ends. What to print for each answer is worked out by pure functions, tested without a
gateway.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from aegaeon.priority import PRIORITIES
from aegaeon.serving import (
    keep_alive_argument,
    keep_alive_text,
    pin_argument,
    pin_text,
    settings_text,
)

DEPLOY_TIMEOUT_S = 900.0  # a .gguf file is converted before the gateway answers
TIMEOUT_S = 60.0
WAIT_POLL_S = 0.5


def add_arguments_for(words: tuple[str, ...], parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gateway", default="http://127.0.0.1:8000", help="gateway base URL")
    parser.add_argument("--api-key", default=os.environ.get("AEGAEON_API_KEY"),
                        help="an admin key, when the gateway has keys (default: $AEGAEON_API_KEY)")  # fmt: skip
    if words[-1] == "deploy":
        parser.add_argument("path", type=Path, help="a Hugging Face model folder or a .gguf file")
        parser.add_argument("--name", default=None, help="default: the folder's or file's name")
        parser.add_argument("--wait", action="store_true", help="wait until it is ready (or failed)")  # fmt: skip
        parser.add_argument("--priority", choices=PRIORITIES, default=None,
                            help="its priority class against other models' work (default: normal)")  # fmt: skip
        parser.add_argument("--pin", type=pin_argument, default=None, metavar="N",
                            help="keep it resident on N worker instances (the aegaeon policy; default: 0, not pinned)")  # fmt: skip
        return
    parser.add_argument("name", help="the model's name")
    if words[-1] == "priority":
        parser.add_argument("priority", choices=PRIORITIES, metavar="CLASS",
                            help=f"{' | '.join(PRIORITIES)}: the scheduler's policies weigh it")  # fmt: skip
    if words[-1] == "pin":
        parser.add_argument("instances", type=pin_argument, metavar="N",
                            help="worker instances that keep it resident (the aegaeon policy); 0 unpins")  # fmt: skip
    if words[-1] == "keep-alive":
        parser.add_argument("seconds", type=keep_alive_argument, metavar="IDLE",
                            help="idle time before it leaves the workers and host caches: seconds, or 90s, 5m, 2h, 1d; 0 keeps it")  # fmt: skip


def request_of(args: argparse.Namespace) -> tuple[str, str, dict[str, Any] | None]:
    """(method, path, JSON body) of the admin call the command makes."""
    verb = args.command[-1]
    if verb == "deploy":
        body: dict[str, Any] = {"path": str(args.path.expanduser().absolute())}
        if args.name:
            body["name"] = args.name
        if args.priority:
            body["priority"] = args.priority
        if args.pin is not None:
            body["pin"] = args.pin
        return "POST", "/v1/aegaeon/models", body
    if verb == "drain":
        return "POST", f"/v1/aegaeon/models/{args.name}/drain", None
    if verb == "priority":
        return "POST", f"/v1/aegaeon/models/{args.name}/priority", {"priority": args.priority}
    if verb == "pin":
        return "POST", f"/v1/aegaeon/models/{args.name}/pin", {"instances": args.instances}
    if verb == "keep-alive":
        return "POST", f"/v1/aegaeon/models/{args.name}/keep_alive", {"seconds": args.seconds}
    return "DELETE", f"/v1/aegaeon/models/{args.name}", None


def error_text(status: int, body: Any) -> str:
    """The gateway's OpenAI-style error message, or what there is of the answer."""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return f"HTTP {status}: {body['error'].get('message')}"
    return f"HTTP {status}: {body}"


def result_text(verb: str, body: dict[str, Any]) -> str:
    """What a successful call did, in a sentence."""
    name = body["id"]
    if verb == "deploy":
        settings = settings_text(body["priority"], body["pin"] or None)  # unpinned goes unsaid
        return f"deployed {name}: {body['state']}, {settings} (its weights are being copied into the host cache)"  # fmt: skip
    if verb == "priority":
        return f"{name} is now {body['priority']} priority ({body['state']})"
    if verb == "pin":
        return f"{name} is now {pin_text(body['pin'])} ({body['state']})"
    if verb == "keep-alive":
        return f"{name} is now {keep_alive_text(body['keep_alive_s'])} ({body['state']})"
    if verb == "drain":
        in_flight = body["queued"] + body["running"]
        return (
            f"{name} is draining: new requests are refused; about {in_flight} queued or running "
            f"finish. Then remove it: aegaeon models remove {name}"
        )
    return f"removed {name}: {body['note']}"


def load_outcome(card: dict[str, Any]) -> str | None:
    """None while the model loads, else how the load ended, in words."""
    if card["state"] == "loading":
        return None
    if card["state"] == "failed":
        return f"{card['id']} failed to load: {card['state_reason']}"
    return f"{card['id']} is {card['state']}"


def _decoded(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


def _wait_loaded(http: httpx.Client, name: str) -> int:
    while True:
        response = http.get(f"/v1/models/{name}")
        if response.status_code != 200:
            print(f"aegaeon models deploy: {error_text(response.status_code, _decoded(response))}", file=sys.stderr)  # fmt: skip
            return 1
        outcome = load_outcome(response.json())
        if outcome is not None:
            print(outcome)
            return 1 if response.json()["state"] == "failed" else 0
        time.sleep(WAIT_POLL_S)


def main(args: argparse.Namespace) -> int:
    verb = args.command[-1]
    method, path, body = request_of(args)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = DEPLOY_TIMEOUT_S if verb == "deploy" else TIMEOUT_S
    with httpx.Client(base_url=args.gateway, headers=headers, timeout=timeout) as http:
        try:
            response = http.request(method, path, json=body)
            if response.status_code >= 400:
                print(f"aegaeon models {verb}: refused: {error_text(response.status_code, _decoded(response))}", file=sys.stderr)  # fmt: skip
                return 1
            print(result_text(verb, response.json()))
            if verb == "deploy" and args.wait:
                return _wait_loaded(http, response.json()["id"])
        except httpx.HTTPError as exc:
            print(f"aegaeon models {verb}: cannot reach the gateway at {args.gateway}: {exc or type(exc).__name__} (is `aegaeon up` running? see --gateway)", file=sys.stderr)  # fmt: skip
            return 1
    return 0
