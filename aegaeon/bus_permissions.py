"""Which NATS subjects each service may publish and subscribe to: one table, derived from
``Subjects``, rendered into the ``authorization`` block of a nats-server config.

Every service connects as the user of its role, so a compromised or buggy worker cannot submit
requests, command other workers or forge the scheduler's replies::

    role         publishes                              subscribes to
    gateway      requests.submit|cancel,                tokens.*, worker.heartbeat,
                 models.list|describe|file|deploy|      scheduler.state, worker.*.events
                 drain|remove|serving,                  (the runtime view), registry.changed,
                 scheduler.unload (requests)            _INBOX.>
    scheduler    worker.*.cmd, tokens.*,                requests.submit|cancel, worker.heartbeat,
                 scheduler.state, models.prefetch|      worker.*.events, scheduler.unload,
                 evict, models.list (request); replies  registry.changed, models.heartbeat, _INBOX.>
    worker       worker.heartbeat, worker.*.events,     worker.*.cmd, _INBOX.>
                 tokens.*, models.list|ensure|ensure.* (requests)
    model-store  registry.changed, models.heartbeat,    models.*, models.ensure.*,
                 models.share.* (requests); replies     models.share.*, worker.heartbeat,
                                                        registry.changed, _INBOX.>
    observer     nothing                                worker.heartbeat, scheduler.state,
                                                        worker.*.events

Request/reply: the asker publishes the request and receives the answer on its ``_INBOX.>``; the
responder answers through NATS's ``allow_responses`` (once per request it received), so no role
may publish into ``_INBOX.>`` at will. The observer is ``aegaeon top`` and ``aegaeon models add``.
Instances of one role share its user: a worker may still publish another worker's events and read
its commands (worker and gateway ids are chosen at start, not known to the server's config).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from aegaeon.servers import config_string
from aegaeon.subjects import Subjects

INBOX = "_INBOX.>"
"""Where nats-py's requests receive their replies."""

ROLES = ("gateway", "scheduler", "worker", "model-store", "observer")
"""Every NATS user; the first four are also ``aegaeon up``'s kinds of child service."""

ANY_PREFIX = Subjects("*")
"""Subjects under any prefix: the deployed config then holds whatever ``AEGAEON_PREFIX`` says."""


@dataclass(frozen=True)
class Permissions:
    """What one role may do on the bus. ``responds``: may answer each request it receives."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    responds: bool = False


def role_permissions(role: str, subjects: Subjects) -> Permissions:
    """The subjects ``role`` needs, and no others. Raises KeyError for an unknown role."""
    s = subjects
    table = {
        "gateway": Permissions(
            publish=(
                s.submit,
                s.cancel,
                *(s.models(verb) for verb in ("list", "describe", "file")),
                # the admin API's verbs
                *(s.models(verb) for verb in ("deploy", "drain", "remove", "serving")),
                s.unload_model,
            ),
            subscribe=(
                s.tokens("*"),
                s.heartbeat,
                s.scheduler_state,
                s.all_worker_events,
                s.registry_changed,
                INBOX,
            ),
        ),
        "scheduler": Permissions(
            publish=(
                s.worker_cmd("*"),
                s.tokens("*"),
                s.scheduler_state,
                s.models("prefetch"),
                s.models("evict"),
                s.models("list"),
            ),
            subscribe=(
                s.submit,
                s.cancel,
                s.heartbeat,
                s.all_worker_events,
                s.unload_model,
                s.registry_changed,
                s.store_heartbeat,
                INBOX,
            ),
            responds=True,
        ),
        "worker": Permissions(
            publish=(
                s.heartbeat,
                s.worker_events("*"),
                s.tokens("*"),
                s.models("list"),
                s.models("ensure"),
                s.models("ensure.*"),
            ),
            subscribe=(s.worker_cmd("*"), INBOX),
        ),
        "model-store": Permissions(
            publish=(s.registry_changed, s.store_heartbeat, s.models("share.*")),
            subscribe=(
                s.models("*"),
                s.models("ensure.*"),
                s.models("share.*"),
                s.heartbeat,
                s.registry_changed,
                INBOX,
            ),
            responds=True,
        ),
        "observer": Permissions(
            publish=(),
            subscribe=(s.heartbeat, s.scheduler_state, s.all_worker_events),
        ),
    }
    return table[role]


def password_variable(role: str) -> str:
    """The environment variable that holds ``role``'s password in a deployment
    (``model-store`` → ``AEGAEON_NATS_MODEL_STORE_PASSWORD``)."""
    return f"AEGAEON_NATS_{role.upper().replace('-', '_')}_PASSWORD"


def _subject_list(subjects: tuple[str, ...]) -> str:
    return "[" + ", ".join(config_string(subject) for subject in subjects) + "]"


def _user_entry(role: str, password: str, permissions: Permissions) -> list[str]:
    # No publish rights is an explicit deny: an empty allow list would mean "no restriction".
    publish = 'deny: [">"]'
    if permissions.publish:
        publish = f"allow: {_subject_list(permissions.publish)}"
    lines = [
        f"    {{user: {config_string(role)}, password: {password}, permissions: {{",
        f"      publish: {{{publish}}}",
        f"      subscribe: {{allow: {_subject_list(permissions.subscribe)}}}",
    ]
    if permissions.responds:
        lines.append("      allow_responses: true")
    return [*lines, "    }}"]


def _authorization(passwords: Mapping[str, str], subjects: Subjects) -> str:
    lines = ["authorization {", "  users = ["]
    for role, password in passwords.items():
        lines += _user_entry(role, password, role_permissions(role, subjects))
    return "\n".join([*lines, "  ]", "}"]) + "\n"


def authorization_block(passwords: Mapping[str, str], subjects: Subjects) -> str:
    """A nats-server ``authorization`` block: one user per role of ``passwords`` (role →
    password), named after its role, with that role's permissions under ``subjects``' prefix."""
    return _authorization({role: config_string(pw) for role, pw in passwords.items()}, subjects)


def deployed_authorization_block() -> str:
    """The block of ``infra/k8s/nats.conf`` (compose and Kubernetes): every role, each password
    read from the server's environment (``password_variable``), subjects under any prefix."""
    return _authorization({role: "$" + password_variable(role) for role in ROLES}, ANY_PREFIX)


if __name__ == "__main__":  # regenerate the block of infra/k8s/nats.conf
    print(deployed_authorization_block(), end="")
