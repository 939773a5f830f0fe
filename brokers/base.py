"""The broker contract, by role: transport, state and inspection.

A broker moves opaque messages between producers and consumer groups. It knows
nothing about events, handlers or sagas: a message is a topic, a
producer-assigned id and a body of bytes. Everything above that lives in
``choreo``.

The contract has three roles, each a Protocol below, and ``Broker`` is all
three; both adapters implement every one:

* ``Transport``: connect, publish, subscribe, fetch, commit, extend,
  extend_many (what a worker needs on its delivery path);
* ``State``: versioned keys, read here and written by compare-and-set inside
  ``Transport.commit``;
* ``Inspection``: what tools read and repair from outside a running system
  (history, group cursors, leases, delayed messages, dead letters, backlog).

Semantics every adapter gives (the contract tests in ``tests/`` hold them to it):

* **Topics and groups.** Every group subscribed to a topic sees every message
  published to it after the group was created, and, where it starts at the
  beginning (``Subscription.start``), what the topic held before: by default
  a group on a topic that no group reads yet starts at its beginning, so
  messages published before the first consumers are not lost, and a group
  added beside others starts at the end. Groups created in one ``subscribe``
  call decide together, from the topic as it was before the call. Consumers
  of one group compete: each message goes to one consumer of the group at a
  time.
* **At-least-once.** A delivery stays pending with its consumer until it is
  committed. A delivery that is not committed within ``visibility_timeout``
  seconds (and not extended: ``extend`` renews one lease, ``extend_many``
  several in one call) may be handed to another consumer of the group.
  Each hand-out counts as a delivery; past ``max_deliveries`` the message goes
  to the dead-letter store with the reason ``"max deliveries exceeded"``.
* **Atomic, fenced commit.** ``commit`` acks a delivery, publishes messages,
  records a dead letter and writes versioned state in one step, and only if the
  consumer still owns the delivery. Either all of it happens or none does.
* **Concurrent commits keep their own outcome.** An adapter with a round
  trip may send commits (and publishes) made while another is on the wire
  together, in one call, as the Redis adapter does; each is still applied,
  fenced and compare-and-set checked on its own, and its caller gets its own
  status or error: one refused, conflicting or invalid commit leaves the
  others of its batch alone, and a failed round trip fails each of them.
  A caller cancelled before its commit was sent has nothing applied.
* **Dedupe.** A message whose id was already settled (committed with
  ``done=True``) in a group is handed to that group once more marked
  ``Delivery.duplicate``, never silently dropped: the broker cannot read the
  body, so the consumer checks that it is what its id says before it commits
  it (a duplicate's commit acks it and applies nothing). A duplicate already
  in flight when the original settles is refused at commit (``DUPLICATE``),
  so a message id takes effect once per group. Records are kept for
  ``dedupe_ttl`` seconds (on Redis, at most ``dedupe_max`` per group: past
  that the oldest go first).
* **Delays.** A message with ``delay`` becomes deliverable that many seconds
  later; a message with ``group`` is delivered to that group of its topic only
  (retries and replays use this, so other groups do not see it twice).
* **Dead letters** keep the original bytes, the reason, the group and the
  delivery count; they can be listed, replayed to their group and purged.
* **Entry ids.** ``Delivery.entry_id`` and the ids in inspection records are
  ``<int>-<int>``, optionally after a ``<tag>:`` naming the queue; within one
  queue they grow in publish order (``GroupCursor.handed_out`` compares them).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from brokers.messages import STARTS, Delivery, Message, Start, Subscription, new_delivery, new_message
from brokers.records import (
    DEAD_LETTER_KEPT,
    CommitStatus,
    DeadLetterRecord,
    DelayedMessage,
    GroupBacklog,
    GroupCursor,
    HistoryEntry,
    PendingEntry,
    StateWrite,
    Versioned,
)
from brokers.speedups import remember

__all__ = (
    "DEAD_LETTER_KEPT",
    "STARTS",
    "Broker",
    "BrokerError",
    "CommitStatus",
    "DeadLetterRecord",
    "DelayedMessage",
    "Delivery",
    "GroupBacklog",
    "GroupCursor",
    "HistoryEntry",
    "Inspection",
    "Message",
    "PendingEntry",
    "Start",
    "State",
    "StateWrite",
    "Subscription",
    "Transport",
    "Versioned",
    "TOPIC_PATTERN",
    "check_name",
    "log_dead_letter",
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


def log_dead_letter(log: logging.Logger, topic: str, group: str, entry_id: str, reason: str) -> None:
    """The log line of a dead letter an adapter made by itself (the consumer
    never saw the entry, so nobody else can say it)."""
    log.error("dead-lettered entry %s on %s for %s: %s", entry_id or "-", topic or "-", group or "-", reason)


class BrokerError(Exception):
    """The broker could not do what was asked (connection, protocol, config).

    ``choreo`` wraps this in its own error tree; ``brokers`` stays importable on
    its own.
    """


@runtime_checkable
class Transport(Protocol):
    """Moving messages: the delivery path of workers and producers.

    Adapters are created unconnected; ``connect`` must be awaited before use
    and ``close`` releases everything. Every method may raise ``BrokerError``.
    """

    #: The URL without credentials, safe to log.
    url: str
    #: Seconds an uncommitted delivery stays with its consumer.
    visibility_timeout: float
    #: Deliveries after which a message is dead-lettered.
    max_deliveries: int

    async def connect(self) -> None:
        """Open connections and check the server. Idempotent.

        Raises:
            BrokerError: the server cannot be reached or refuses the credentials.
        """

    async def close(self) -> None:
        """Release connections and background tasks. Idempotent."""

    async def publish(self, messages: Sequence[Message]) -> None:
        """Publish messages, all or none. Concurrent calls may share a round
        trip, each with its own outcome (see the module doc).

        Raises:
            BrokerError: a topic or group name is invalid, or the transport
                failed (in which case some may have been published: consumers
                dedupe on ``Message.id``).
        """

    async def subscribe(self, subscriptions: Sequence[Subscription]) -> None:
        """Create the groups if missing, each where its ``start`` says
        (``"auto"``: the topic's beginning if no group read it before this
        call, else its end).

        Idempotent: an existing group keeps its position.

        Raises:
            BrokerError: a name is invalid, or the transport failed.
        """

    async def fetch(
        self,
        consumer: str,
        subscriptions: Sequence[Subscription],
        *,
        limit: int,
        timeout: float,
        max_size: int | None = None,
    ) -> list[Delivery]:
        """Hand out up to ``limit`` deliveries to ``consumer``.

        Waits up to ``timeout`` seconds for the first one, then returns what it
        has (possibly nothing). Along the way the broker moves due delayed
        messages, reclaims deliveries idle past ``visibility_timeout``,
        dead-letters those past ``max_deliveries`` and marks duplicates of
        messages already settled in the group. Entries the broker cannot read
        at all, and (with ``max_size``) bodies over ``max_size`` bytes, are
        dead-lettered, never returned: an oversized one keeps only its first
        ``DEAD_LETTER_KEPT`` bytes, its size and its SHA-1. Whatever the broker
        dead-letters by itself is logged (logger ``brokers``) with the reason.

        Raises:
            BrokerError: not connected, a name is invalid, or a configuration
                problem (an adapter may ride out a passing outage by
                returning ``[]``).
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
        with a delay. Without a delivery: publishes and writes state atomically
        (each ``StateWrite`` is a compare-and-set: see ``State``). Concurrent
        calls may share a round trip; each is applied or refused on its own.

        Returns:
            ``OK``, or why nothing was written.

        Raises:
            BrokerError: a published name is invalid, ``dead_letter`` without
                a delivery, or the transport failed.
        """
        ...

    async def extend(self, delivery: Delivery) -> bool:
        """Renew the lease of a delivery still being worked on.

        Returns:
            ``False`` if the consumer no longer owns it.

        Raises:
            BrokerError: not connected, or the transport failed.
        """
        ...

    async def extend_many(self, deliveries: Sequence[Delivery]) -> list[bool]:
        """Renew many leases at once, as ``extend`` renews one: a worker
        renews every long-running delivery it holds in one call, so one
        slow round trip, not one per delivery, stands between a lease and
        its renewal. Each delivery is checked and renewed on its own: one
        the consumer no longer owns is ``False`` and leaves the others
        renewed.

        Returns:
            Per delivery, in order, whether its lease was renewed.

        Raises:
            BrokerError: not connected, or the transport failed (an adapter
                with partitions renews in the ones it reached before it raises).
        """
        ...


@runtime_checkable
class State(Protocol):
    """Versioned keys: read here, written only inside ``Transport.commit``.

    A key's version is 1 after its first write and grows by one with each;
    a deleted key reads as absent (version 0 for ``StateWrite``).
    """

    url: str

    async def get_state(self, key: str, *, near: Delivery | None = None) -> Versioned | None:
        """Read one state key (``None`` if absent).

        ``near``: the delivery whose commit may write the key next. A broker
        with partitions (Redis Cluster) keeps state in the partition of the
        commit that wrote it, and reads it there; without ``near`` it looks
        in every partition and returns the highest version.

        Raises:
            BrokerError: not connected, or the transport failed.
        """
        ...

    async def list_state(self, prefix: str) -> dict[str, Versioned]:
        """Read every state key that starts with ``prefix``.

        Raises:
            BrokerError: not connected, or the transport failed.
        """
        ...


@runtime_checkable
class Inspection(Protocol):
    """What operators and tools read (and repair) from outside the workers.

    None of these is on the delivery path; they may scan. Every method raises
    ``BrokerError`` when not connected or when the transport fails.
    """

    url: str

    async def history(
        self, *, message_id: str | None = None, containing: bytes | None = None, since: float | None = None
    ) -> list[HistoryEntry]:
        """The entries the broker still keeps (retention may have dropped
        older ones), each topic's queue and then its groups' queues, oldest
        first within each queue.

        Args:
            message_id: Only entries with this producer id.
            containing: Only entries whose body contains these bytes.
            since: Unix time: entries published before it may be left out
                (a hint that saves a scan; callers filter what they need).
        """
        ...

    async def cursors(self) -> list[GroupCursor]:
        """Every consumer group's position in both of its queues, grouped by topic."""
        ...

    async def pending(self, subscriptions: Sequence[Subscription], limit: int = 1000) -> list[PendingEntry]:
        """The leases of each subscription (at most ``limit`` each), oldest
        entry first, in the order of ``subscriptions``.

        Raises:
            BrokerError: also for an invalid name.
        """
        ...

    async def delayed(self, limit: int = 1000) -> list[DelayedMessage]:
        """Messages waiting for their delay, soonest first."""
        ...

    async def backlog(self, subscriptions: Sequence[Subscription]) -> list[GroupBacklog]:
        """Report the work each subscription still has, in the given order.

        Raises:
            BrokerError: also for an invalid name.
        """
        ...

    async def dead_letters(self, limit: int = 1000) -> list[DeadLetterRecord]:
        """List dead letters, oldest first."""
        ...

    async def replay(self, dead_letter_id: str) -> bool:
        """Publish a dead letter again to its group (or its topic if it had
        none), forget it was settled there, and remove the dead letter.

        Returns:
            ``False`` if no such dead letter exists.

        Raises:
            BrokerError: the dead letter keeps only part of an oversized
                entry (``DeadLetterRecord.size``): there is nothing whole to
                publish again.
        """
        ...

    async def purge_dead_letters(self, ids: Sequence[str] | None = None) -> int:
        """Delete the given dead letters (all if ``None``); return how many."""
        ...


@runtime_checkable
class Broker(Transport, State, Inspection, Protocol):
    """The whole contract (see the module doc): what ``brokers.from_url``
    returns and what ``choreo``'s runtime is given. Code that needs one role
    only should ask for that Protocol."""
