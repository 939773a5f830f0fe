"""The transport contract every broker adapter implements.

A broker moves opaque messages between producers and consumer groups. It knows
nothing about events, handlers or sagas: a message is a topic, a
producer-assigned id and a body of bytes. Everything above that lives in
``choreo``.

Semantics every adapter gives (the contract tests in ``tests/`` hold them to it):

* **Topics and groups.** Every group subscribed to a topic sees every message
  published to it after the group was created (a new group starts at the end of
  the topic, history is not replayed). Consumers of one group compete: each
  message goes to one consumer of the group at a time.
* **At-least-once.** A delivery stays pending with its consumer until it is
  committed. A delivery that is not committed within ``visibility_timeout``
  seconds (and not extended) may be handed to another consumer of the group.
  Each hand-out counts as a delivery; past ``max_deliveries`` the message goes
  to the dead-letter store with the reason ``"max deliveries exceeded"``.
* **Atomic, fenced commit.** ``commit`` acks a delivery, publishes messages,
  records a dead letter and writes versioned state in one step, and only if the
  consumer still owns the delivery. Either all of it happens or none does.
* **Dedupe.** A message whose id was already settled (committed with
  ``done=True``) in a group is not delivered to that group again; the broker
  acks such a duplicate by itself. A duplicate already in flight when the
  original settles is refused at commit (``DUPLICATE``), so a message id takes
  effect once per group. Records are kept for ``dedupe_ttl`` seconds.
* **Delays.** A message with ``delay`` becomes deliverable that many seconds
  later; a message with ``group`` is delivered to that group of its topic only
  (retries and replays use this, so other groups do not see it twice).
* **Dead letters** keep the original bytes, the reason, the group and the
  delivery count; they can be listed, replayed to their group and purged.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import attrs

from brokers.speedups import remember, slot_setters

__all__ = (
    "Broker",
    "BrokerError",
    "CommitStatus",
    "DeadLetterRecord",
    "Delivery",
    "GroupBacklog",
    "Message",
    "StateWrite",
    "Subscription",
    "Versioned",
    "TOPIC_PATTERN",
    "check_name",
    "new_delivery",
    "new_message",
)

#: Topic and group names: letters, digits and ``._-:``; nothing that could
#: become a hostile key, path or import. Adapters reject anything else.
TOPIC_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,199}$")
_valid_names: dict[str, str] = {}


def check_name(kind: str, name: str) -> None:
    """Refuse a topic or group name outside ``TOPIC_PATTERN`` with ``BrokerError``.

    Adapters check names for every message and fetch, so each valid name is
    remembered and the regex runs once per name (``brokers.speedups.remember``).
    """
    if isinstance(name, str) and name in _valid_names:
        return
    if not isinstance(name, str) or not TOPIC_PATTERN.fullmatch(name):
        raise BrokerError(f"invalid {kind} name {name!r}: use letters, digits and ._-: (at most 200)")
    remember(_valid_names, name, name)


class BrokerError(Exception):
    """The broker could not do what was asked (connection, protocol, config).

    ``choreo`` wraps this in its own error tree; ``brokers`` stays importable on
    its own.
    """


@attrs.frozen
class Message:
    """A message handed to the broker for publishing.

    Attributes:
        topic: Where it goes (one stream per topic on Redis).
        id: Producer-assigned, unique; consumers dedupe on it.
        body: Opaque bytes.
        delay: Seconds until it becomes deliverable; ``None`` or 0 is now.
        group: If set, only this group of ``topic`` receives it.
    """

    topic: str
    id: str
    body: bytes
    delay: float | None = None
    group: str | None = None


@attrs.frozen
class Subscription:
    """A consumer group on a topic."""

    topic: str
    group: str


@attrs.frozen
class Delivery:
    """One hand-out of a message to a consumer of a group.

    Attributes:
        topic: The topic the message was published to.
        group: The group it was delivered to.
        consumer: The consumer that holds it now.
        entry_id: The broker's id of this entry (not the producer's id).
        message_id: The producer's id, or ``None`` if the entry had none.
        body: The message bytes, exactly as published.
        deliveries: How many times this entry has been handed out, this one
            included (1 on first delivery).
    """

    topic: str
    group: str
    consumer: str
    entry_id: str
    message_id: str | None
    body: bytes
    deliveries: int


_new = object.__new__
# Message and Delivery have no converters or validators to skip (and the
# builders keep Message's defaults), so setting their slots makes exactly what
# __init__ makes (``slot_setters``).
_message_slots = slot_setters(Message)
_delivery_slots = slot_setters(Delivery)


def new_message(topic: str, id: str, body: bytes, delay: float | None = None, group: str | None = None) -> Message:
    """``Message(topic, id, body, delay, group)``, built faster."""
    message = _new(Message)
    set_topic, set_id, set_body, set_delay, set_group = _message_slots
    set_topic(message, topic)
    set_id(message, id)
    set_body(message, body)
    set_delay(message, delay)
    set_group(message, group)
    return message


def new_delivery(
    topic: str, group: str, consumer: str, entry_id: str, message_id: str | None, body: bytes, deliveries: int
) -> Delivery:
    """``Delivery(...)`` with the fields in order, built faster."""
    delivery = _new(Delivery)
    set_topic, set_group, set_consumer, set_entry, set_message, set_body, set_deliveries = _delivery_slots
    set_topic(delivery, topic)
    set_group(delivery, group)
    set_consumer(delivery, consumer)
    set_entry(delivery, entry_id)
    set_message(delivery, message_id)
    set_body(delivery, body)
    set_deliveries(delivery, deliveries)
    return delivery


@attrs.frozen
class StateWrite:
    """A compare-and-set of one state key, applied inside ``commit``.

    Attributes:
        key: The state key.
        value: The new value, or ``None`` to delete the key.
        expected_version: The version the key must have now; 0 means it must
            not exist. A successful write makes the version
            ``expected_version + 1``.
    """

    key: str
    value: bytes | None
    expected_version: int


@attrs.frozen
class Versioned:
    """A state value with its version (1 after the first write)."""

    value: bytes
    version: int


class CommitStatus(enum.Enum):
    """How a commit ended. Anything but ``OK`` means none of the commit's
    effects (publishes, state, dead letter) were written."""

    OK = "ok"
    #: The delivery is no longer owned by this consumer (its lease expired and
    #: another consumer claimed it, or it was already acked).
    LEASE_LOST = "lease_lost"
    #: A ``StateWrite`` found a version other than the one expected.
    CONFLICT = "conflict"
    #: The delivery's message id was settled in its group while it was in
    #: flight (a producer duplicate handled at the same time as the original):
    #: the delivery is acked, nothing else is written.
    DUPLICATE = "duplicate"


@attrs.frozen
class DeadLetterRecord:
    """A message that will not be processed again unless replayed.

    Attributes:
        id: The dead letter's own id (pass it to ``replay``).
        topic: The topic of the original message.
        group: The group that gave up on it ("" if none did).
        message_id: The producer's id, if the message had one.
        body: The original bytes, undecoded.
        reason: Why it was dead-lettered, in words.
        deliveries: How many times it had been delivered.
        dead_at: Unix time of dead-lettering.
    """

    id: str
    topic: str
    group: str
    message_id: str | None
    body: bytes
    reason: str
    deliveries: int
    dead_at: float


@attrs.frozen
class GroupBacklog:
    """Work a group still has on a topic.

    Attributes:
        ready: Published but not yet delivered to the group.
        pending: Delivered and not yet committed (in flight or abandoned).
        delayed: Scheduled for later (for the topic as a whole or this group).
    """

    topic: str
    group: str
    ready: int
    pending: int
    delayed: int

    @property
    def idle(self) -> bool:
        return self.ready == 0 and self.pending == 0 and self.delayed == 0


@runtime_checkable
class Broker(Protocol):
    """A message transport with consumer-group semantics (see module doc).

    Adapters are created unconnected; ``connect`` must be awaited before use
    and ``close`` releases everything. All methods may raise ``BrokerError``.
    """

    #: The URL without credentials, safe to log.
    url: str
    #: Seconds an uncommitted delivery stays with its consumer.
    visibility_timeout: float
    #: Deliveries after which a message is dead-lettered.
    max_deliveries: int

    async def connect(self) -> None:
        """Open connections and check the server. Idempotent."""

    async def close(self) -> None:
        """Release connections and background tasks. Idempotent."""

    async def publish(self, messages: Sequence[Message]) -> None:
        """Publish messages, all or none.

        Raises:
            BrokerError: a topic or group name is invalid, or the transport
                failed (in which case some may have been published: consumers
                dedupe on ``Message.id``).
        """

    async def subscribe(self, subscriptions: Sequence[Subscription]) -> None:
        """Create the groups if missing, each at the end of its topic.

        Idempotent: an existing group keeps its position.
        """

    async def fetch(
        self,
        consumer: str,
        subscriptions: Sequence[Subscription],
        *,
        limit: int,
        timeout: float,
    ) -> list[Delivery]:
        """Hand out up to ``limit`` deliveries to ``consumer``.

        Waits up to ``timeout`` seconds for the first one, then returns what it
        has (possibly nothing). Along the way the broker moves due delayed
        messages, reclaims deliveries idle past ``visibility_timeout``,
        dead-letters those past ``max_deliveries`` and drops duplicates of
        messages already settled in the group. Entries the broker cannot read
        at all are dead-lettered, never returned.
        """
        ...

    async def commit(
        self,
        delivery: Delivery | None = None,
        *,
        publish: Sequence[Message] = (),
        dead_letter: str | None = None,
        state: Sequence[StateWrite] = (),
        done: bool = True,
    ) -> CommitStatus:
        """Settle a delivery and apply its effects atomically.

        With a delivery: acks it if ``consumer`` still owns it; with
        ``dead_letter`` also records it as a dead letter with that reason; with
        ``done`` records its message id as settled in the group (dedupe). A
        retry is ``done=False`` plus the same message republished to the group
        with a delay. Without a delivery: publishes and writes state atomically.

        Returns:
            ``OK``, or why nothing was written.
        """
        ...

    async def extend(self, delivery: Delivery) -> bool:
        """Renew the lease of a delivery still being worked on.

        Returns:
            ``False`` if the consumer no longer owns it.
        """
        ...

    async def get_state(self, key: str) -> Versioned | None:
        """Read one state key."""
        ...

    async def list_state(self, prefix: str) -> dict[str, Versioned]:
        """Read every state key that starts with ``prefix``."""
        ...

    async def backlog(self, subscriptions: Sequence[Subscription]) -> list[GroupBacklog]:
        """Report the work each subscription still has, in the given order."""
        ...

    async def dead_letters(self, limit: int = 1000) -> list[DeadLetterRecord]:
        """List dead letters, oldest first."""
        ...

    async def replay(self, dead_letter_id: str) -> bool:
        """Publish a dead letter again to its group (or its topic if it had
        none), forget it was settled there, and remove the dead letter.

        Returns:
            ``False`` if no such dead letter exists.
        """
        ...

    async def purge_dead_letters(self, ids: Sequence[str] | None = None) -> int:
        """Delete the given dead letters (all if ``None``); return how many."""
        ...
