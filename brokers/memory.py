"""The in-memory broker: the contract of ``brokers.base`` inside one process.

A real adapter, not a mock. Each topic is a log of entries; each consumer group
has its own cursor into the log, a private queue for messages targeted at it,
a pending list (entry -> consumer, delivery count, lease deadline) and a record
of settled message ids. Commits validate everything before they change
anything, so they are atomic and fenced exactly like the Redis script.

Leases, delays and dedupe expiry read time from an injectable ``clock``, so a
test harness can run the broker on virtual time: ``next_due`` says when the
next delayed message or lease expiry becomes actionable, and ``poke`` wakes
waiting fetchers after the clock has jumped. ``fetch`` timeouts stay real.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import itertools
import logging
import time
from collections.abc import Callable, Iterator, Sequence

from brokers.base import (
    DEAD_LETTER_KEPT,
    BrokerError,
    CommitStatus,
    DeadLetterRecord,
    Delivery,
    Message,
    StateWrite,
    Subscription,
    Versioned,
    log_dead_letter,
    new_delivery,
)
from brokers.memory_inspection import MemoryInspection
from brokers.memory_records import (
    Entry,
    Group,
    Pending,
    Topic,
    check_message,
    check_subscriptions,
)
from brokers.options import BrokerOptions

__all__ = ("MemoryBroker",)

log = logging.getLogger("brokers.memory")

#: Real seconds between re-checks while delayed work or leases are outstanding:
#: the clock may be virtual and move without telling anyone.
_POLL_INTERVAL = 0.05
MAX_DELIVERIES_REASON = "max deliveries exceeded"


class MemoryBroker(MemoryInspection):
    """A ``brokers.base.Broker`` that lives in this process (``memory://``).

    Args:
        options: Delivery options; defaults to ``BrokerOptions()``.
        clock: Monotonic time source for leases, delays and dedupe expiry.
    """

    url = "memory://"

    def __init__(self, options: BrokerOptions | None = None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.options = options if options is not None else BrokerOptions()
        self.visibility_timeout = self.options.visibility_timeout
        self.max_deliveries = self.options.max_deliveries
        self._clock = clock
        self._connected = False
        self._topics: dict[str, Topic] = {}
        self._delayed: list[tuple[float, int, Message]] = []
        self._dead: dict[str, DeadLetterRecord] = {}
        self._state: dict[str, Versioned] = {}
        self._counter = itertools.count(1)
        self._turn = 0
        self._changed = asyncio.Event()
        self._waiting = 0  # fetches waiting on _changed

    async def connect(self) -> None:
        """Mark the broker usable. Idempotent; state survives close/connect."""
        self._connected = True

    async def close(self) -> None:
        """Stop serving; waiting fetchers return ``[]``. Idempotent."""
        self._connected = False
        self._notify()

    def poke(self) -> None:
        """Wake every waiting fetcher so it re-checks (after a clock jump)."""
        self._notify()

    def next_due(self) -> float | None:
        """The earliest clock time at which a delayed message or an expired
        lease becomes actionable, or ``None`` if nothing is scheduled."""
        return self._next_due(None)

    async def publish(self, messages: Sequence[Message]) -> None:
        """Publish messages, all or none (names are checked first).

        Raises:
            BrokerError: not connected, or a topic or group name is invalid.
        """
        self._require_connected()
        for message in messages:
            check_message(message)
        self._publish(messages, self._clock())
        self._notify()

    async def subscribe(self, subscriptions: Sequence[Subscription]) -> None:
        """Create missing groups where their ``start`` says (see ``Transport.subscribe``).

        Raises:
            BrokerError: not connected, or a name is invalid.
        """
        self._require_connected()
        check_subscriptions(subscriptions)
        # Read first, create after: groups created together decide together.
        read = {sub.topic: bool(self._topic(sub.topic).groups) for sub in subscriptions}
        for sub in subscriptions:
            self._topic(sub.topic).add_group(sub.group, sub.start, read[sub.topic])

    async def fetch(
        self,
        consumer: str,
        subscriptions: Sequence[Subscription],
        *,
        limit: int,
        timeout: float,
        max_size: int | None = None,
    ) -> list[Delivery]:
        """Hand out up to ``limit`` deliveries, waiting up to ``timeout`` real
        seconds for the first; see ``Transport.fetch``.

        Raises:
            BrokerError: not connected, or a name is invalid. A fetch already
                waiting when the broker closes returns ``[]``.
        """
        self._require_connected()
        check_subscriptions(subscriptions)
        subs = list(dict.fromkeys(subscriptions))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        while True:
            changed = self._changed
            found = self._take(consumer, subs, limit, max_size)
            if found or not self._connected:
                return found
            wait = deadline - loop.time()
            if wait <= 0:
                return []
            due = self._next_due(subs)
            if due is not None:
                wait = min(wait, _POLL_INTERVAL, max(due - self._clock(), 0.001))
            self._waiting += 1
            try:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await changed.wait()
            finally:
                self._waiting -= 1

    async def commit(
        self,
        delivery: Delivery | None = None,
        *,
        publish: Sequence[Message] = (),
        dead_letter: str | None = None,
        state: Sequence[StateWrite] = (),
        done: bool = True,
    ) -> CommitStatus:
        """Ack, dead-letter, publish and write state in one step; see
        ``Broker.commit``. ``dead_letter`` and ``done`` need a delivery.

        Raises:
            BrokerError: not connected, or a published name is invalid.
        """
        self._require_connected()
        for message in publish:
            check_message(message)
        now = self._clock()
        # Validate everything first: a refused commit writes nothing.
        owned = self._owned(delivery) if delivery is not None else None
        if delivery is not None and owned is None:
            return CommitStatus.LEASE_LOST
        marked = dead_letter is not None and delivery is not None and delivery.duplicate
        if owned is not None and not marked and owned[1].entry.message_id in owned[0].settled:
            # A duplicate in flight while the original settled: ack it, nothing else (one
            # handed out marked may be dead-lettered: another message under the same id).
            del owned[0].pending[owned[1].entry.entry_id]
            self._notify()
            return CommitStatus.DUPLICATE
        versions: dict[str, int] = {}
        for write in state:
            current = self._state.get(write.key)
            if versions.get(write.key, current.version if current is not None else 0) != write.expected_version:
                return CommitStatus.CONFLICT
            versions[write.key] = 0 if write.value is None else write.expected_version + 1

        if delivery is not None and owned is not None:
            group, lease = owned
            del group.pending[delivery.entry_id]
            if done:
                group.settle(lease.entry.message_id, now + self.options.dedupe_ttl)
            if dead_letter is not None:
                self._add_dead_letter(delivery.topic, delivery.group, lease.entry, dead_letter, lease.deliveries)
        for write in state:
            if write.value is None:
                self._state.pop(write.key, None)
            else:
                self._state[write.key] = Versioned(bytes(write.value), write.expected_version + 1)
        self._publish(publish, now)
        self._notify()
        return CommitStatus.OK

    async def extend(self, delivery: Delivery) -> bool:
        """Renew one lease (see ``extend_many``)."""
        return (await self.extend_many([delivery]))[0]

    async def extend_many(self, deliveries: Sequence[Delivery]) -> list[bool]:
        """Renew each lease for another ``visibility_timeout``; ``False`` for
        each delivery the consumer no longer owns."""
        self._require_connected()
        deadline = self._clock() + self.visibility_timeout
        renewed = []
        for delivery in deliveries:
            owned = self._owned(delivery)
            if owned is not None:
                owned[1].deadline = deadline
            renewed.append(owned is not None)
        return renewed

    async def get_state(self, key: str, *, near: Delivery | None = None) -> Versioned | None:
        """Read one state key."""
        self._require_connected()
        return self._state.get(key)

    async def list_state(self, prefix: str) -> dict[str, Versioned]:
        """Read every state key that starts with ``prefix``."""
        self._require_connected()
        return {key: item for key, item in self._state.items() if key.startswith(prefix)}

    def _require_connected(self) -> None:
        if not self._connected:
            raise BrokerError("memory broker is not connected (await connect() first)")

    def _notify(self) -> None:
        if self._waiting:  # a fresh Event per change costs; only pay it when a fetch waits
            self._changed.set()
            self._changed = asyncio.Event()

    def _owned(self, delivery: Delivery) -> tuple[Group, Pending] | None:
        """The delivery's group and lease, if its consumer still holds it from
        this hand-out (a reclaim, even by the same consumer, bumps the count)."""
        topic = self._topics.get(delivery.topic)
        group = topic.groups.get(delivery.group) if topic is not None else None
        lease = group.pending.get(delivery.entry_id) if group is not None else None
        if group is None or lease is None or lease.consumer != delivery.consumer:
            return None
        if lease.deliveries != delivery.deliveries:
            return None
        return group, lease

    def _topic(self, name: str) -> Topic:
        topic = self._topics.get(name)
        if topic is None:
            topic = self._topics[name] = Topic()
        return topic

    def _group(self, topic: Topic, name: str) -> Group:
        group = topic.groups.get(name)
        if group is None:
            group = topic.groups[name] = Group(cursor=topic.last_seq)
        return group

    def _publish(self, messages: Sequence[Message], now: float) -> None:
        for message in messages:
            if message.delay is not None and message.delay > 0:
                heapq.heappush(self._delayed, (now + message.delay, next(self._counter), message))
            else:
                self._append(message)

    def _append(self, message: Message) -> None:
        topic = self._topic(message.topic)
        group = self._group(topic, message.group) if message.group is not None else None
        topic.last_seq += 1
        entry = Entry(topic.last_seq, message.id, bytes(message.body))
        if group is not None:
            group.private.append(entry)
        else:
            topic.append(entry)
            topic.trim(self.options.maxlen or None)

    def _release_due(self, now: float) -> None:
        while self._delayed and self._delayed[0][0] <= now:
            _, _, message = heapq.heappop(self._delayed)
            self._append(message)

    def _next_due(self, subs: Sequence[Subscription] | None) -> float | None:
        times = [self._delayed[0][0]] if self._delayed else []
        for name, topic in self._topics.items():
            for group_name, group in topic.groups.items():
                if subs is None or Subscription(name, group_name) in subs:
                    times.extend(lease.deadline for lease in group.pending.values())
        return min(times, default=None)

    def _add_dead_letter(
        self, topic: str, group: str, entry: Entry, reason: str, deliveries: int, *, by_broker: bool = False
    ) -> None:
        """Record a dead letter; ``by_broker``: made here, so logged here (no consumer saw it)."""
        dead_id = f"dl-{next(self._counter)}"
        body, size, sha1 = entry.body, None, None
        if len(body) > DEAD_LETTER_KEPT and by_broker:
            body, size, sha1 = body[:DEAD_LETTER_KEPT], len(body), hashlib.sha1(body).hexdigest()
        self._dead[dead_id] = DeadLetterRecord(
            dead_id, topic, group, entry.message_id, body, reason, deliveries, time.time(), size, sha1
        )
        if by_broker:
            log_dead_letter(log, topic, group, entry.entry_id, reason)

    def _take(
        self, consumer: str, subs: Sequence[Subscription], limit: int, max_size: int | None = None
    ) -> list[Delivery]:
        now = self._clock()
        self._release_due(now)
        if not subs or limit <= 0:
            return []
        # Round-robin, one delivery per subscription per round, starting at a
        # different subscription each call, so no topic starves another.
        start = self._turn % len(subs)
        self._turn += 1
        sources = [self._hand_out(consumer, sub, now, max_size) for sub in [*subs[start:], *subs[:start]]]
        found: list[Delivery] = []
        while sources and len(found) < limit:
            for source in list(sources):
                delivery = next(source, None)
                if delivery is None:
                    sources.remove(source)
                    continue
                found.append(delivery)
                if len(found) == limit:
                    break
        return found

    def _hand_out(self, consumer: str, sub: Subscription, now: float, max_size: int | None) -> Iterator[Delivery]:
        """Deliveries for one group, lazily: reclaimed leases first, then the
        group's private queue, then the topic's log."""
        topic = self._topic(sub.topic)
        group = self._group(topic, sub.group)
        group.forget_expired(now)
        for lease in [lease for lease in group.pending.values() if lease.deadline <= now]:
            del group.pending[lease.entry.entry_id]
            if lease.deliveries >= self.max_deliveries:
                self._add_dead_letter(
                    sub.topic, sub.group, lease.entry, MAX_DELIVERIES_REASON, lease.deliveries, by_broker=True
                )
                continue
            yield self._lease(consumer, sub, group, lease.entry, lease.deliveries + 1, now)
        while True:
            entry = self._next_new(topic, group)
            if entry is None:
                return
            if max_size is not None and len(entry.body) > max_size:
                reason = f"oversized entry: {len(entry.body)} bytes, over the {max_size}-byte limit"
                self._add_dead_letter(sub.topic, sub.group, entry, reason, 1, by_broker=True)
                continue
            yield self._lease(consumer, sub, group, entry, 1, now)

    def _next_new(self, topic: Topic, group: Group) -> Entry | None:
        if group.private:
            return group.private.popleft()
        index = topic.after(group.cursor)
        if index == len(topic.log):
            return None
        entry = topic.log[index]
        group.cursor = entry.seq
        return entry

    def _lease(
        self, consumer: str, sub: Subscription, group: Group, entry: Entry, deliveries: int, now: float
    ) -> Delivery:
        entry_id = entry.entry_id
        group.pending[entry_id] = Pending(entry, consumer, deliveries, now + self.visibility_timeout)
        # A settled id is handed out marked, never dropped: only the consumer
        # can read the body and tell a true duplicate from a reused id.
        return new_delivery(
            sub.topic, sub.group, consumer, entry_id, entry.message_id, entry.body, deliveries,
            entry.message_id in group.settled,
        )
