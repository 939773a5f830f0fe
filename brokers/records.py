"""Values of the broker contract besides messages and deliveries (see
``brokers.base``): state writes and reads, commit outcomes, and what the
inspection methods return.

Inspection records are plain values about the messages a broker holds: its
history, the groups' positions and leases, delayed messages, dead letters and
backlogs. They carry the broker's own entry ids, which are
``Delivery.entry_id`` values: an entry seen in ``history`` can be matched
with a ``PendingEntry`` or a delivery.
"""

from __future__ import annotations

import enum

import attrs

__all__ = (
    "DEAD_LETTER_KEPT",
    "CommitStatus",
    "DeadLetterRecord",
    "DelayedMessage",
    "GroupBacklog",
    "GroupCursor",
    "HistoryEntry",
    "PendingEntry",
    "StateWrite",
    "Versioned",
)


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
    #: The delivery's message id was settled in its group already (a producer
    #: duplicate, handed out marked or handled at the same time as the
    #: original): the delivery is acked, nothing else is written. A delivery
    #: handed out marked ``duplicate`` may still be dead-lettered: its
    #: consumer found another message under the same id.
    DUPLICATE = "duplicate"



def _position(entry_id: str) -> tuple[int, int]:
    # Entry ids are ``<int>-<int>`` after an optional ``<tag>:`` naming the queue.
    ms, _, seq = entry_id.rpartition(":")[2].partition("-")
    return int(ms or 0), int(seq or 0)


#: Bytes a dead letter keeps of an entry over the consumer's size limit: a
#: person can still see what it was, and the dead-letter store stays small.
DEAD_LETTER_KEPT = 4096


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
        size: For an oversized entry, its size in bytes: ``body`` then
            keeps only its first ``DEAD_LETTER_KEPT`` bytes, and such a
            dead letter cannot be replayed. ``None`` when ``body`` is whole.
        sha1: The SHA-1 (hex) of the whole entry, when ``size`` is set.
    """

    id: str
    topic: str
    group: str
    message_id: str | None
    body: bytes
    reason: str
    deliveries: int
    dead_at: float
    size: int | None = None
    sha1: str | None = None


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


@attrs.frozen
class HistoryEntry:
    """A message the broker still keeps in a topic, delivered or not.

    Attributes:
        topic: The topic it was published to.
        group: The group it was sent to (``Message.group``: retries and
            replays), or ``None`` for a message to the whole topic.
        entry_id: The broker's id of the entry (as ``Delivery.entry_id``).
        message_id: The producer's id, or ``None`` if the entry had none.
        body: The bytes, exactly as published.
    """

    topic: str
    group: str | None
    entry_id: str
    message_id: str | None
    body: bytes


@attrs.frozen
class GroupCursor:
    """How far a consumer group has been handed the entries of one queue.

    A group reads two queues of its topic: the topic's own (``private``
    false) and the messages sent to the group alone (``private`` true).

    Attributes:
        topic: The topic.
        group: The consumer group.
        private: Whether this is the group's own queue rather than the topic's.
        last_delivered: The entry id up to which (inclusive) the group has
            been handed this queue's entries; ``"0-0"`` before the first.
    """

    topic: str
    group: str
    private: bool
    last_delivered: str

    def holds(self, entry_id: str) -> bool:
        """Whether ``entry_id`` is an entry of this cursor's queue: a broker
        with partitions (Redis Cluster) has one queue per partition, and
        one cursor for each."""
        return entry_id.rpartition(":")[0] == self.last_delivered.rpartition(":")[0]

    def handed_out(self, entry_id: str) -> bool:
        """Whether the entry ``entry_id`` of this queue was handed to the group
        (it may still be pending); ``False`` means it is still waiting."""
        return _position(entry_id) <= _position(self.last_delivered)


@attrs.frozen
class PendingEntry:
    """An entry handed to a consumer and not committed yet (a lease).

    Attributes:
        topic: The topic.
        group: The consumer group.
        entry_id: The entry (as ``Delivery.entry_id``).
        consumer: The consumer holding it now.
        deliveries: How many times it has been handed out.
    """

    topic: str
    group: str
    entry_id: str
    consumer: str
    deliveries: int


@attrs.frozen
class DelayedMessage:
    """A message published with a delay that is not deliverable yet.

    Attributes:
        topic: Where it goes when due.
        group: The only group it goes to, or ``None`` for the whole topic.
        message_id: The producer's id.
        body: The bytes.
        due_in: Seconds until it becomes deliverable (0 if overdue).
    """

    topic: str
    group: str | None
    message_id: str
    body: bytes
    due_in: float
