"""The ``Inspection`` role of the in-memory broker (``MemoryBroker`` mixes it
in): history, cursors, leases, delayed messages, backlog and dead letters,
read from the broker's own records (``brokers.memory_records``)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Protocol

from brokers.base import (
    BrokerError,
    DeadLetterRecord,
    DelayedMessage,
    GroupBacklog,
    GroupCursor,
    HistoryEntry,
    Message,
    PendingEntry,
    Subscription,
)
from brokers.memory_records import Entry, Group, Topic, check_subscriptions

__all__ = ("MemoryInspection",)


class _Host(Protocol):
    """What the mixin needs from the broker it is part of."""

    _clock: Callable[[], float]
    _topics: dict[str, Topic]
    _delayed: list[tuple[float, int, Message]]
    _dead: dict[str, DeadLetterRecord]

    def _require_connected(self) -> None: ...

    def _release_due(self, now: float) -> None: ...

    def _topic(self, name: str) -> Topic: ...

    def _group(self, topic: Topic, name: str) -> Group: ...

    def _append(self, message: Message) -> None: ...

    def _notify(self) -> None: ...


class MemoryInspection:
    """Inspection of ``MemoryBroker`` (see ``brokers.base.Inspection``)."""

    async def history(
        self: _Host, *, message_id: str | None = None, containing: bytes | None = None, since: float | None = None
    ) -> list[HistoryEntry]:
        """The entries still kept: each topic's log (compacted once every group
        is done with an entry), then each group's undelivered private queue.
        ``since`` is ignored: entries carry no publish time here."""
        self._require_connected()

        def wanted(entry: Entry) -> bool:
            return (message_id is None or entry.message_id == message_id) and (
                containing is None or containing in entry.body)

        found = []
        for name, topic in self._topics.items():
            found += [HistoryEntry(name, None, e.entry_id, e.message_id, e.body) for e in topic.log if wanted(e)]
            for group_name, group in topic.groups.items():
                found += [HistoryEntry(name, group_name, e.entry_id, e.message_id, e.body)
                          for e in group.private if wanted(e)]
        return found

    async def cursors(self: _Host) -> list[GroupCursor]:
        """Each group's cursor into its topic's log, and into its private queue."""
        self._require_connected()
        found = []
        for name, topic in self._topics.items():
            for group_name, group in topic.groups.items():
                found.append(GroupCursor(name, group_name, False, f"{group.cursor}-0"))
                # The private queue hands out in order and forgets what it
                # handed out: everything before its first entry was delivered.
                last = group.private[0].seq - 1 if group.private else topic.last_seq
                found.append(GroupCursor(name, group_name, True, f"{last}-0"))
        return found

    async def pending(self: _Host, subscriptions: Sequence[Subscription], limit: int = 1000) -> list[PendingEntry]:
        """The leases of each subscription, in hand-out order.

        Raises:
            BrokerError: not connected, or a name is invalid.
        """
        self._require_connected()
        check_subscriptions(subscriptions)
        found = []
        for sub in subscriptions:
            topic = self._topics.get(sub.topic)
            group = topic.groups.get(sub.group) if topic is not None else None
            if group is not None:
                leases = itertools.islice(group.pending.items(), max(0, limit))
                found += [PendingEntry(sub.topic, sub.group, entry_id, lease.consumer, lease.deliveries)
                          for entry_id, lease in leases]
        return found

    async def delayed(self: _Host, limit: int = 1000) -> list[DelayedMessage]:
        """Messages waiting for their delay, soonest first."""
        self._require_connected()
        now = self._clock()
        return [
            DelayedMessage(m.topic, m.group, m.id, bytes(m.body), max(0.0, due - now))
            for due, _, m in sorted(self._delayed)[: max(0, limit)]
        ]

    async def backlog(self: _Host, subscriptions: Sequence[Subscription]) -> list[GroupBacklog]:
        """Ready, pending and delayed counts per subscription, in order."""
        self._require_connected()
        self._release_due(self._clock())
        report = []
        for sub in subscriptions:
            topic = self._topics.get(sub.topic)
            group = topic.groups.get(sub.group) if topic is not None else None
            ready = pending = 0
            if topic is not None and group is not None:
                delivered = topic.after(group.cursor)
                ready = len(topic.log) - delivered + len(group.private)
                pending = len(group.pending)
            delayed = sum(1 for _, _, m in self._delayed if m.topic == sub.topic and m.group in (None, sub.group))
            report.append(GroupBacklog(sub.topic, sub.group, ready, pending, delayed))
        return report

    async def dead_letters(self: _Host, limit: int = 1000) -> list[DeadLetterRecord]:
        """List dead letters, oldest first."""
        self._require_connected()
        return list(itertools.islice(self._dead.values(), max(0, limit)))

    async def replay(self: _Host, dead_letter_id: str) -> bool:
        """Republish a dead letter to its group (or topic), forget that the
        group settled it, and remove it; ``False`` if there is no such one."""
        self._require_connected()
        record = self._dead.get(dead_letter_id)
        if record is None:
            return False
        if record.size is not None:
            raise BrokerError(
                f"dead letter {dead_letter_id} keeps only the first {len(record.body)} of {record.size} bytes "
                "of an oversized entry: it cannot be replayed"
            )
        del self._dead[dead_letter_id]
        message_id = record.message_id or record.id
        if record.group:
            self._group(self._topic(record.topic), record.group).settled.pop(message_id, None)
        self._append(Message(record.topic, message_id, record.body, group=record.group or None))
        self._notify()
        return True

    async def purge_dead_letters(self: _Host, ids: Sequence[str] | None = None) -> int:
        """Delete the given dead letters (all if ``None``); return how many."""
        self._require_connected()
        if ids is None:
            count = len(self._dead)
            self._dead.clear()
            return count
        return sum(1 for dead_id in set(ids) if self._dead.pop(dead_id, None) is not None)
