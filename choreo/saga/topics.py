"""The saga event families: every saga topic name is built and read here.

* ``saga.cmd.<service>.<action>``: a command to a participant's action.
* ``saga.reply.<saga>``: a participant's answer to a saga's command.
* ``saga.timeout.<saga>``: a delayed timer (a step's timeout, the deadline).
* ``saga.<saga>.started|compensating|completed|compensated|failed``:
  lifecycle events, for any service to handle. ``compensating`` marks the
  start of compensation (also when a resume retries failed compensations);
  ``compensated`` or ``failed`` its end.

Saga, service and action names are letters, digits, ``_`` and ``-`` (see
``SagaStep``), and ``cmd``, ``reply`` and ``timeout`` are not saga names, so
the families never overlap and a topic parses one way only.
"""

from __future__ import annotations

from choreo.actions import REPLY_PREFIX, command_topic
from choreo.saga.states import TERMINAL_STATES

__all__ = (
    "LIFECYCLE_PHASES",
    "REPLY_PREFIX",
    "RESERVED_SAGA_NAMES",
    "COMPENSATING",
    "ENDS",
    "STARTED",
    "command_topic",
    "is_lifecycle",
    "is_timeout",
    "lifecycle_topic",
    "parse_lifecycle",
    "parse_reply",
    "reply_topic",
    "timeout_topic",
)

# The command and reply families are the core's (``choreo.actions``): actions
# are core routes, and the saga package is a plug-in on them.
PREFIX = "saga."
TIMEOUT_PREFIX = "saga.timeout."

#: The last segment of a lifecycle event: ``started``, ``compensating``, then the terminal state it ended in.
STARTED = "started"
COMPENSATING = "compensating"
ENDS = tuple(state.value for state in TERMINAL_STATES)
LIFECYCLE_PHASES = (STARTED, COMPENSATING, *ENDS)
#: Saga names that would collide with the coordinator's own event families.
RESERVED_SAGA_NAMES = frozenset({"cmd", "reply", "timeout"})


def reply_topic(saga: str) -> str:
    """The event participants answer a saga's commands with: ``saga.reply.<saga>``."""
    return f"{REPLY_PREFIX}{saga}"


def timeout_topic(saga: str) -> str:
    """The delayed event that fires when a step (or the saga) runs out of time."""
    return f"{TIMEOUT_PREFIX}{saga}"


def lifecycle_topic(saga: str, phase: str) -> str:
    """``saga.<saga>.<phase>``, ``phase`` one of ``LIFECYCLE_PHASES``."""
    return f"{PREFIX}{saga}.{phase}"


def parse_lifecycle(topic: str) -> tuple[str, str] | None:
    """``(saga, phase)`` of a lifecycle event's topic; ``None`` for any other topic."""
    if not topic.startswith(PREFIX):
        return None
    saga, dot, phase = topic[len(PREFIX):].rpartition(".")
    if not dot or not saga or phase not in LIFECYCLE_PHASES or "." in saga or saga in RESERVED_SAGA_NAMES:
        return None
    return saga, phase


def is_lifecycle(topic: str) -> bool:
    """Whether ``topic`` is a saga lifecycle event (``saga.<saga>.<phase>``)."""
    return parse_lifecycle(topic) is not None


def parse_reply(topic: str) -> str | None:
    """The saga a reply topic answers; ``None`` for any other topic."""
    if not topic.startswith(REPLY_PREFIX) or len(topic) == len(REPLY_PREFIX):
        return None
    return topic[len(REPLY_PREFIX):]


def is_timeout(topic: str) -> bool:
    """Whether ``topic`` is the timer topic of some saga (``saga.timeout.<saga>``)."""
    return topic.startswith(TIMEOUT_PREFIX) and len(topic) > len(TIMEOUT_PREFIX)
