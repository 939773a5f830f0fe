"""Saga participants as core routes: command and reply topics, and the
records that ``Router.action`` and ``Router.compensates`` keep.

An action consumes ``saga.cmd.<service>.<action>`` and answers the saga that
sent the command on the topic named by the command's ``reply_to`` header,
one of ``saga.reply.<saga>``. Which sagas command an action is known only to
their coordinators (maybe in other processes), so the core knows the topic
formats and nothing else of sagas: the orchestrator in ``choreo.saga`` is a
plug-in built on these.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs

from choreo.errors import Reject

if TYPE_CHECKING:
    from choreo.events import Event

__all__ = (
    "ACTION_INTERCEPTOR",
    "COMMAND_PREFIX",
    "REPLY_PREFIX",
    "Compensation",
    "Interceptor",
    "ReplyTopics",
    "command_topic",
    "reply_to_command",
)

COMMAND_PREFIX = "saga.cmd."
REPLY_PREFIX = "saga.reply."

#: Called before an action runs with (service, action, data); may raise to
#: make the call fail. A lifespan hook installs one in the runtime's
#: ``extensions`` under ``ACTION_INTERCEPTOR`` (``SagaTestHarness`` records
#: calls and injects failures so).
Interceptor = Callable[[str, str, dict[str, Any]], None]
ACTION_INTERCEPTOR = "choreo.action_interceptor"


def command_topic(service: str, action: str) -> str:
    """The event a participant's action consumes: ``saga.cmd.<service>.<action>``."""
    return f"{COMMAND_PREFIX}{service}.{action}"


class ReplyTopics(tuple[str, ...]):
    """The declared outputs of an action route: the reply topic of any saga.

    Membership is by family: every ``saga.reply.<name>`` is declared.
    Iterating shows the family's root.
    """

    def __new__(cls) -> ReplyTopics:
        return super().__new__(cls, ("saga.reply",))

    def __contains__(self, item: object) -> bool:
        return isinstance(item, str) and item.startswith(REPLY_PREFIX) and len(item) > len(REPLY_PREFIX)


@attrs.frozen
class Compensation:
    """``handler`` (a route name of the service) undoes ``target`` when ``trigger`` arrives."""

    service: str
    target: str
    trigger: str
    handler: str


def reply_to_command(command: Event, action: str) -> tuple[str, dict[str, Any]]:
    """Where to answer saga ``command`` for ``action``, and the reply's
    fields that identify the saga, step and attempt (the outcome is added
    once the action has run).

    Raises:
        Reject: the command names no valid reply topic (it is dead-lettered).
    """
    headers = command.headers
    reply_to = headers.get("reply_to", "")
    if reply_to not in ReplyTopics():
        raise Reject(f"saga command {command.id} has no valid reply_to header")
    return reply_to, {
        "saga": headers.get("saga"),
        "step": headers.get("saga_step"),
        "kind": headers.get("saga_kind"),
        "token": _int(headers.get("saga_token")),
        "attempt": _int(headers.get("saga_attempt")),
        "action": action,
    }


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
