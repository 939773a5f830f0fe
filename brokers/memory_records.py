"""The records the in-memory broker keeps, and its name checks.

A topic is a log of entries; each consumer group has a cursor into it, a
private queue for messages targeted at the group, its pending leases and the
message ids it has settled (see ``brokers.memory``).
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Sequence

import attrs

from brokers.base import Message, Start, Subscription, check_name

__all__ = (
    "COMPACT_EVERY",
    "UNREAD_KEPT",
    "Entry",
    "Group",
    "Pending",
    "Topic",
    "check_message",
    "check_name",
    "check_subscriptions",
)


#: Appends between compactions of a topic that has no ``maxlen``.
COMPACT_EVERY = 1024
#: Entries a topic without any group keeps (without ``maxlen``), waiting for
#: its first group: memory stays bounded for topics nobody ever reads.
UNREAD_KEPT = 100_000


@attrs.define(eq=False)
class Entry:
    """One message in a topic's log (or a group's private queue); never
    changed once made. Not frozen: one is made per published message, and a
    frozen attrs instance costs twice as much to make (5,100 instructions
    against 2,100 here, callgrind)."""

    seq: int
    message_id: str
    body: bytes

    @property
    def entry_id(self) -> str:
        return f"{self.seq}-0"


@attrs.define
class Pending:
    """A lease: the entry handed to ``consumer``, until ``deadline`` (clock time)."""

    entry: Entry
    consumer: str
    deliveries: int
    deadline: float


@attrs.define
class Group:
    """A consumer group's position in its topic and what it holds."""

    #: Sequence number of the last log entry handed to this group.
    cursor: int
    private: deque[Entry] = attrs.Factory(deque)
    #: Entry id -> lease, in hand-out order.
    pending: dict[str, Pending] = attrs.Factory(dict)
    #: Settled message id -> expiry; insertion order is expiry order because
    #: the TTL is fixed and the clock never goes back.
    settled: dict[str, float] = attrs.Factory(dict)

    def settle(self, message_id: str, expiry: float) -> None:
        """Record ``message_id`` as settled until ``expiry`` (moved to the end: the latest expiry)."""
        self.settled.pop(message_id, None)
        self.settled[message_id] = expiry

    def forget_expired(self, now: float) -> None:
        """Drop the settled ids whose expiry has passed (they are the oldest)."""
        while self.settled:
            message_id, expiry = next(iter(self.settled.items()))
            if expiry > now:
                return
            del self.settled[message_id]


@attrs.define
class Topic:
    """A topic's log (oldest first, compacted) and its groups.

    ``seqs`` holds the log's sequence numbers, in step with ``log``, for
    ``bisect`` to search in C: a search with ``key=`` calls back into Python
    at each of its ~10 steps, and every fetch of every group searches.
    """

    log: list[Entry] = attrs.Factory(list)
    groups: dict[str, Group] = attrs.Factory(dict)
    last_seq: int = 0
    seqs: list[int] = attrs.Factory(list)

    def append(self, entry: Entry) -> None:
        """Add ``entry`` (numbered past every entry so far) to the log."""
        self.log.append(entry)
        self.seqs.append(entry.seq)

    def after(self, seq: int) -> int:
        """The log index of the first entry numbered above ``seq``."""
        return bisect.bisect_right(self.seqs, seq)

    def add_group(self, name: str, start: Start, read: bool) -> None:
        """Create group ``name`` if missing, where ``start`` says (``read``:
        some group read this topic before; see ``Subscription.start``)."""
        if name not in self.groups:
            at_end = start == "end" or (start == "auto" and read)
            self.groups[name] = Group(cursor=self.last_seq if at_end else 0)

    def trim(self, maxlen: int | None) -> None:
        """Apply retention after an append.

        Retention drops only entries below everything still needed by some
        group: its next undelivered entry and every entry pending with it.
        Without ``maxlen`` nothing keeps history in memory: every entry that
        all groups are done with goes, checked every ``COMPACT_EVERY`` appends;
        a topic without groups keeps its newest ``UNREAD_KEPT`` entries.
        """
        if maxlen is None:
            if self.last_seq % COMPACT_EVERY:
                return
            # A topic no group reads yet keeps its newest entries for the
            # first group to come (see ``Subscription.start``), boundedly.
            maxlen = 0 if self.groups else UNREAD_KEPT
        elif len(self.log) <= maxlen:
            return
        floor = min(
            (
                min([group.cursor + 1, *(lease.entry.seq for lease in group.pending.values())])
                for group in self.groups.values()
            ),
            default=self.last_seq + 1,
        )
        cut = min(bisect.bisect_left(self.seqs, floor), len(self.log) - maxlen)
        del self.log[:cut]
        del self.seqs[:cut]


# Names already checked (a system has few topics and groups; bounded anyway).
def check_message(message: Message) -> None:
    check_name("topic", message.topic)
    if message.group is not None:
        check_name("group", message.group)


def check_subscriptions(subscriptions: Sequence[Subscription]) -> None:
    for sub in subscriptions:
        check_name("topic", sub.topic)
        check_name("group", sub.group)

