"""Each service's NATS user may use the subjects of its role and no others
(``aegaeon/bus_permissions.py``), checked on a real nats-server with the config ``aegaeon up``
writes (a whole ``aegaeon up`` stack with a user per service: test_bus_permissions_up.py).

A refused publish or subscription does not close a NATS connection: the server answers
``-ERR 'Permissions Violation …'``, which nats-py hands to the connection's error callback. Those
answers come in the order of what was refused, but not in order with other replies (a PONG may
overtake one, so ``flush()`` proves nothing). So a client ends each check with a publish every
role is refused (into a reply inbox) and waits for its refusal: every refusal of what it sent
before has then arrived. Evidence, not a sleep."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from aegaeon.bus_permissions import (
    INBOX,
    ROLES,
    authorization_block,
    deployed_authorization_block,
    password_variable,
    role_permissions,
)
from aegaeon.servers import ServerProcess, start_nats
from aegaeon.subjects import Subjects

S = Subjects("perm")
REPLY_TIMEOUT_S = 5.0


def matches(pattern: str, subject: str) -> bool:
    """NATS wildcard matching: ``*`` is one token, a final ``>`` one or more."""
    want, got = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(got) > i
        if i >= len(got) or (token != "*" and token != got[i]):
            return False
    return len(want) == len(got)


def allowed(patterns: tuple[str, ...], subject: str) -> bool:
    return any(matches(p, subject) for p in patterns)


EVERY_SUBJECT = {
    "submit": S.submit,
    "cancel": S.cancel,
    "worker_cmd": S.worker_cmd("worker-0"),
    "worker_events": S.worker_events("worker-0"),
    "heartbeat": S.heartbeat,
    "tokens": S.tokens("gw-0"),
    "scheduler_state": S.scheduler_state,
    "registry_changed": S.registry_changed,
    "store_heartbeat": S.store_heartbeat,
    "unload_model": S.unload_model,
    **{f"models.{verb}": S.models(verb)
       for verb in ("list", "describe", "ensure", "prefetch", "file", "deploy", "drain", "remove",
                    "serving")},
}  # fmt: skip
"""One concrete subject of each kind that Subjects defines."""

UNASKED: set[str] = set()
"""Answered, but asked by no service or tool today: no role may send it."""

REQUESTS = {
    S.submit, S.unload_model,
    *(S.models(v) for v in ("list", "describe", "ensure", "file", "deploy", "drain", "remove",
                            "serving")),
}  # fmt: skip
"""Subjects asked with request/reply (the rest are fire and forget)."""


# ---------------------------------------------------------------- the table itself


def test_the_nats_wildcard_matcher_of_these_tests_follows_nats() -> None:
    assert matches("a.*.c", "a.b.c") and not matches("a.*.c", "a.b.d.c")
    assert matches("a.>", "a.b.c") and not matches("a.>", "a")
    assert not matches("a.b", "a.b.c") and not matches("a.b.c", "a.b")


@pytest.mark.parametrize("kind", sorted(EVERY_SUBJECT))
def test_every_subject_has_a_role_that_sends_it_and_one_that_receives_it(kind: str) -> None:
    subject = EVERY_SUBJECT[kind]
    table = {role: role_permissions(role, S) for role in ROLES}
    senders = [r for r, p in table.items() if allowed(p.publish, subject)]
    assert bool(senders) != (subject in UNASKED), f"{subject} sent by {senders}"
    assert [r for r, p in table.items() if allowed(p.subscribe, subject)], f"nobody gets {subject}"


def test_every_request_subject_is_answered_by_a_responding_role() -> None:
    for subject in REQUESTS:
        answerers = [r for r in ROLES if allowed(role_permissions(r, S).subscribe, subject)]
        askers = [r for r in ROLES if allowed(role_permissions(r, S).publish, subject)]
        assert askers or subject in UNASKED, subject
        assert answerers and all(role_permissions(r, S).responds for r in answerers), subject
        assert all(INBOX in role_permissions(r, S).subscribe for r in askers), subject


def test_no_role_may_publish_into_reply_inboxes_or_outside_its_prefix() -> None:
    for role in ROLES:
        permissions = role_permissions(role, S)
        assert not allowed(permissions.publish, "_INBOX.forged.reply"), role
        assert all(p.startswith("perm.") for p in permissions.publish), role
        assert all(p.startswith("perm.") or p == INBOX for p in permissions.subscribe), role


def test_the_observer_only_listens() -> None:
    observer = role_permissions("observer", S)
    assert observer.publish == () and not observer.responds
    assert set(observer.subscribe) == {S.heartbeat, S.scheduler_state, S.all_worker_events}


def test_each_role_has_its_own_password_variable() -> None:
    variables = [password_variable(role) for role in ROLES]
    assert len(set(variables)) == len(ROLES)
    assert password_variable("model-store") == "AEGAEON_NATS_MODEL_STORE_PASSWORD"
    block = deployed_authorization_block()
    assert all(f"password: ${v}," in block for v in variables)


# ---------------------------------------------------------------- on a real nats-server


@dataclass
class RoleClient:
    """One connection as a role, with every refusal the server sent it."""

    role: str
    nc: Client
    refused: list[str]
    refusal_came: asyncio.Event

    async def refusals(self) -> list[str]:
        """The refusals of everything sent so far (then forgotten): sends a barrier that every
        role is refused and waits for its refusal, which comes after all earlier ones."""
        barrier = f"_INBOX.barrier.{uuid.uuid4().hex}"
        await self.nc.publish(barrier, b"")
        async with asyncio.timeout(REPLY_TIMEOUT_S):
            while not any(barrier.lower() in r for r in self.refused):
                self.refusal_came.clear()
                await self.refusal_came.wait()
        found = [r for r in self.refused if barrier.lower() not in r]
        self.refused.clear()
        return found

    async def publish_refused(self, subject: str) -> bool:
        await self.nc.publish(subject, b"x")
        return any(f'publish to "{subject.lower()}"' in r for r in await self.refusals())

    async def subscribe_refused(self, subject: str) -> bool:
        sub = await self.nc.subscribe(subject)
        refused = any(f'subscription to "{subject.lower()}"' in r for r in await self.refusals())
        await sub.unsubscribe()
        return refused


@dataclass
class PermissionServer:
    server: ServerProcess
    passwords: dict[str, str]

    async def connect(self, role: str, password: str | None = None) -> RoleClient:
        refused: list[str] = []
        refusal_came = asyncio.Event()

        async def on_error(exc: Exception) -> None:
            refused.append(str(exc).lower())
            refusal_came.set()

        nc = await nats.connect(
            self.server.url, user=role, password=password or self.passwords[role],
            error_cb=on_error, allow_reconnect=False, connect_timeout=5,
        )  # fmt: skip
        return RoleClient(role, nc, refused, refusal_came)


@pytest.fixture(scope="module")
def permission_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PermissionServer]:
    """A nats-server with the users ``aegaeon up`` makes (passwords of this module)."""
    passwords = {role: secrets.token_urlsafe(24) for role in ROLES}
    folder = tmp_path_factory.mktemp("nats-permissions")
    server = start_nats(folder, authorization=authorization_block(passwords, S))
    yield PermissionServer(server, passwords)
    server.stop()


@pytest.fixture
async def clients(permission_server: PermissionServer) -> AsyncIterator[dict[str, RoleClient]]:
    """A connection per role."""
    connected = {role: await permission_server.connect(role) for role in ROLES}
    yield connected
    for client in connected.values():
        await client.nc.close()


async def test_a_role_with_another_roles_password_is_refused(permission_server) -> None:
    with pytest.raises(Exception, match=r"(?i)authorization"):
        await permission_server.connect("gateway", permission_server.passwords["worker"])


async def test_every_role_may_subscribe_to_and_publish_every_subject_of_its_role(clients) -> None:
    concrete = {"*": "x1", ">": "x2"}
    for role, client in clients.items():
        permissions = role_permissions(role, S)
        for pattern in permissions.subscribe:
            assert not await client.subscribe_refused(pattern), (role, pattern)
        for pattern in permissions.publish:
            subject = ".".join(concrete.get(t, t) for t in pattern.split("."))
            assert not await client.publish_refused(subject), (role, subject)


async def next_msg(sub, timeout: float = REPLY_TIMEOUT_S) -> Msg:
    return await sub.next_msg(timeout=timeout)


async def test_the_services_reach_each_other_through_their_roles(clients) -> None:
    """Every flow of the system, each from the role that sends it to those that receive it."""
    gateway, scheduler, worker = clients["gateway"], clients["scheduler"], clients["worker"]
    store, observer = clients["model-store"], clients["observer"]

    async def answer(msg: Msg) -> None:
        await msg.respond(b"answer to " + msg.subject.encode())

    await scheduler.nc.subscribe(S.submit, cb=answer)
    await scheduler.nc.subscribe(S.unload_model, cb=answer)
    for verb in ("list", "ensure", "file", "describe", "deploy", "drain", "remove", "serving"):
        await store.nc.subscribe(S.models(verb), cb=answer, queue="model-store")
    await store.nc.subscribe(S.models("share.store-b"), cb=answer)  # another node's store
    prefetch = await store.nc.subscribe(S.models("prefetch"))
    commands = await worker.nc.subscribe(S.worker_cmd("*"))
    tokens = await gateway.nc.subscribe(S.tokens("*"))
    cancels = await scheduler.nc.subscribe(S.cancel)
    events = [await c.nc.subscribe(S.all_worker_events) for c in (scheduler, observer)]
    states = [await c.nc.subscribe(S.scheduler_state) for c in (gateway, observer)]
    beats = [await c.nc.subscribe(S.heartbeat) for c in (gateway, scheduler, store, observer)]
    news = [await c.nc.subscribe(S.registry_changed) for c in (gateway, scheduler, store)]
    for client in clients.values():
        assert await client.refusals() == [], client.role

    asked = [
        (gateway, S.submit), (gateway, S.models("list")), (gateway, S.models("file")),
        (scheduler, S.models("list")), (worker, S.models("list")), (worker, S.models("ensure")),
        *((gateway, S.models(v)) for v in ("describe", "deploy", "drain", "remove", "serving")),
        (gateway, S.unload_model), (store, S.models("share.store-b")),
    ]  # fmt: skip
    for client, subject in asked:
        reply = await client.nc.request(subject, b"?", timeout=REPLY_TIMEOUT_S)
        assert reply.data == b"answer to " + subject.encode(), (client.role, subject)

    await scheduler.nc.publish(S.worker_cmd("worker-0"), b"assign")
    assert (await next_msg(commands)).data == b"assign"
    await scheduler.nc.publish(S.models("prefetch"), b"hint")
    assert (await next_msg(prefetch)).data == b"hint"
    for sender in (worker, scheduler):  # the scheduler too: a failed request's last batch
        await sender.nc.publish(S.tokens("gw-0"), sender.role.encode())
        assert (await next_msg(tokens)).data == sender.role.encode()
    await gateway.nc.publish(S.cancel, b"gone")
    assert (await next_msg(cancels)).data == b"gone"
    await worker.nc.publish(S.worker_events("worker-0"), b"done")
    await worker.nc.publish(S.heartbeat, b"beat")
    await scheduler.nc.publish(S.scheduler_state, b"state")
    for sub in events:
        assert (await next_msg(sub)).data == b"done"
    for sub in beats:
        assert (await next_msg(sub)).data == b"beat"
    for sub in states:
        assert (await next_msg(sub)).data == b"state"
    await store.nc.publish(S.registry_changed, b"moved")
    for sub in news:
        assert (await next_msg(sub)).data == b"moved"
    for client in clients.values():
        assert await client.refusals() == [], client.role


DENIED_PUBLISH = {
    "gateway": [S.worker_cmd("worker-0"), S.tokens("gw-1"), S.heartbeat, S.models("ensure"),
                S.scheduler_state, S.registry_changed],
    "worker": [S.submit, S.cancel, S.worker_cmd("worker-1"), S.scheduler_state,
               S.models("prefetch"), S.models("deploy"), S.models("remove"), S.models("serving"),
               S.unload_model],
    "scheduler": [S.heartbeat, S.worker_events("worker-0"), S.submit, S.models("ensure"),
                  S.models("drain"), S.models("serving"), S.registry_changed],
    "model-store": [S.heartbeat, S.tokens("gw-0"), S.models("list"), S.worker_cmd("worker-0"),
                    S.unload_model],
    "observer": [S.submit, S.cancel, S.models("list"), S.models("describe"), S.heartbeat,
                 S.worker_cmd("worker-0"), S.tokens("gw-0"), S.models("deploy"),
                 S.registry_changed],
}  # fmt: skip
DENIED_SUBSCRIBE = {
    "gateway": [S.worker_cmd("*"), S.submit, S.models("ensure"), "perm.>"],
    "worker": [S.tokens("*"), S.submit, S.heartbeat, S.all_worker_events, S.scheduler_state,
               S.registry_changed],
    "scheduler": [S.tokens("*"), S.worker_cmd("*"), S.models("ensure")],
    "model-store": [S.tokens("*"), S.worker_cmd("*"), S.submit, S.scheduler_state],
    "observer": [S.tokens("*"), S.worker_cmd("*"), S.submit, S.models("list"), INBOX, ">",
                 S.unload_model],
}  # fmt: skip


@pytest.mark.parametrize("role", ROLES)
async def test_a_role_is_refused_what_its_role_does_not_need(clients, role: str) -> None:
    client = clients[role]
    for subject in [*DENIED_PUBLISH[role], "_INBOX.forged.reply"]:
        assert await client.publish_refused(subject), (role, "publish", subject)
    for subject in DENIED_SUBSCRIBE[role]:
        assert await client.subscribe_refused(subject), (role, "subscribe", subject)


async def test_a_refused_command_never_reaches_the_worker(clients) -> None:
    """The gateway's forged command is dropped by the server; the scheduler's, sent after it
    (and after the refusal came back), is the first the worker gets."""
    worker, gateway, scheduler = clients["worker"], clients["gateway"], clients["scheduler"]
    commands = await worker.nc.subscribe(S.worker_cmd("worker-0"))
    await worker.nc.flush()
    assert await gateway.publish_refused(S.worker_cmd("worker-0"))
    await scheduler.nc.publish(S.worker_cmd("worker-0"), b"from the scheduler")
    assert (await next_msg(commands)).data == b"from the scheduler"


async def test_the_model_store_answers_requests_but_cannot_publish_into_inboxes(clients) -> None:
    store, gateway = clients["model-store"], clients["gateway"]
    inbox = gateway.nc.new_inbox()
    replies = await gateway.nc.subscribe(inbox)
    assert await store.publish_refused(inbox)  # not asked: a forged answer

    async def answer(msg: Msg) -> None:
        await msg.respond(b"listed")

    await store.nc.subscribe(S.models("list"), cb=answer)
    await store.nc.flush()
    await gateway.nc.publish(S.models("list"), b"?", reply=inbox)
    assert (await next_msg(replies)).data == b"listed"  # the forged one never came
    assert await store.refusals() == []
