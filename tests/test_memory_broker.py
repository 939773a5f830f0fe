"""What only the in-memory broker offers: virtual time (``clock``, ``next_due``,
``poke``) for test harnesses, and its lifecycle details."""

from __future__ import annotations

import time

import anyio
import pytest
from anyio.lowlevel import checkpoint

import brokers
from brokers import BrokerError, BrokerOptions, CommitStatus, Delivery, Message, Subscription
from brokers.memory import MemoryBroker

SUB = Subscription("order.created", "inventory.reserve")


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def virtual_broker(clock: FakeClock, **options: object) -> MemoryBroker:
    broker = MemoryBroker(BrokerOptions(**options), clock=clock)  # type: ignore[arg-type]
    await broker.connect()
    await broker.subscribe([SUB])
    return broker


async def test_from_url_gives_a_memory_broker_with_url_options() -> None:
    """``memory://`` with query options builds a MemoryBroker that satisfies the Broker protocol."""
    broker = brokers.from_url("memory://?visibility_timeout=7&max_deliveries=2")
    assert isinstance(broker, MemoryBroker)
    assert isinstance(broker, brokers.Broker)
    assert (broker.url, broker.visibility_timeout, broker.max_deliveries) == ("memory://", 7.0, 2)


async def test_unconnected_broker_refuses_work() -> None:
    """Using the broker before connect raises BrokerError; connect and close are idempotent."""
    broker = MemoryBroker()
    with pytest.raises(BrokerError):
        await broker.publish([Message(SUB.topic, "m1", b"x")])
    await broker.connect()
    await broker.connect()
    await broker.publish([Message(SUB.topic, "m1", b"x")])
    await broker.close()
    await broker.close()
    with pytest.raises(BrokerError):
        await broker.fetch("c", [SUB], limit=1, timeout=0)


async def test_close_wakes_a_waiting_fetch() -> None:
    """A fetch waiting for messages returns an empty list as soon as the broker closes."""
    broker = MemoryBroker()
    await broker.connect()
    await broker.subscribe([SUB])
    result: list[Delivery] | None = None

    async def fetch() -> None:
        nonlocal result
        result = await broker.fetch("c", [SUB], limit=1, timeout=30)

    started = time.monotonic()
    async with anyio.create_task_group() as tg:
        tg.start_soon(fetch)
        await checkpoint()  # the fetch task runs until it waits
        await broker.close()
    assert result == []
    assert time.monotonic() - started < 5


async def test_next_due_is_none_when_nothing_is_scheduled() -> None:
    """With no delayed message and no lease outstanding there is nothing to wait for."""
    broker = await virtual_broker(FakeClock())
    assert broker.next_due() is None
    await broker.publish([Message(SUB.topic, "m1", b"x")])
    assert broker.next_due() is None


async def test_delayed_message_becomes_deliverable_when_clock_advances() -> None:
    """A delayed message is due at publish time plus delay on the injected clock."""
    clock = FakeClock()
    broker = await virtual_broker(clock)
    await broker.publish([Message(SUB.topic, "m1", b"x", delay=3600)])
    assert broker.next_due() == clock.now + 3600
    assert await broker.fetch("c", [SUB], limit=1, timeout=0) == []
    clock.advance(3599)
    assert await broker.fetch("c", [SUB], limit=1, timeout=0) == []
    clock.advance(1)
    (delivery,) = await broker.fetch("c", [SUB], limit=1, timeout=0)
    assert delivery.message_id == "m1"
    assert broker.next_due() == clock.now + broker.visibility_timeout  # now its lease is what is due


async def test_poke_wakes_a_waiting_fetch_after_the_clock_jumps() -> None:
    """A fetch waiting on real time picks up a message made due by a clock jump once poked."""
    clock = FakeClock()
    broker = await virtual_broker(clock)
    await broker.publish([Message(SUB.topic, "m1", b"x", delay=60)])
    got: list[Delivery] = []

    async def fetch() -> None:
        got.extend(await broker.fetch("c", [SUB], limit=1, timeout=30))

    started = time.monotonic()
    async with anyio.create_task_group() as tg:
        tg.start_soon(fetch)
        await checkpoint()  # the fetch task runs until it waits
        assert got == []
        due = broker.next_due()
        assert due is not None
        clock.now = due
        broker.poke()
    assert [d.message_id for d in got] == ["m1"]
    assert time.monotonic() - started < 5


async def test_expired_lease_is_reclaimed_on_virtual_time() -> None:
    """An uncommitted delivery moves to another consumer once the clock passes its lease."""
    clock = FakeClock()
    broker = await virtual_broker(clock, visibility_timeout=30.0)
    await broker.publish([Message(SUB.topic, "m1", b"x")])
    (first,) = await broker.fetch("c1", [SUB], limit=1, timeout=0)
    assert broker.next_due() == clock.now + 30
    clock.advance(29)
    assert await broker.extend(first)
    clock.advance(29)
    assert await broker.fetch("c2", [SUB], limit=1, timeout=0) == []
    clock.advance(1)
    (second,) = await broker.fetch("c2", [SUB], limit=1, timeout=0)
    assert (second.entry_id, second.deliveries) == (first.entry_id, 2)
    assert await broker.commit(first) is CommitStatus.LEASE_LOST


async def test_dedupe_record_expires_after_ttl() -> None:
    """A settled id is remembered for dedupe_ttl seconds (a copy comes back marked
    duplicate and its commit only acks it), then a copy is an ordinary delivery again."""
    clock = FakeClock()
    broker = await virtual_broker(clock, dedupe_ttl=100.0)
    await broker.publish([Message(SUB.topic, "m1", b"x")])
    (first,) = await broker.fetch("c", [SUB], limit=1, timeout=0)
    assert await broker.commit(first) is CommitStatus.OK
    clock.advance(99)
    await broker.publish([Message(SUB.topic, "m1", b"x")])
    (copy,) = await broker.fetch("c", [SUB], limit=1, timeout=0)
    assert copy.duplicate and await broker.commit(copy) is CommitStatus.DUPLICATE
    clock.advance(1)
    await broker.publish([Message(SUB.topic, "m1", b"x")])
    assert [(d.message_id, d.duplicate) for d in await broker.fetch("c", [SUB], limit=1, timeout=0)] == [("m1", False)]


async def test_maxlen_trims_entries_every_group_is_done_with() -> None:
    """Retention drops settled entries down to maxlen once no group needs them."""
    broker = await virtual_broker(FakeClock(), maxlen=3)
    await broker.publish([Message(SUB.topic, f"m{n}", b"x") for n in range(10)])
    assert len(broker._topics[SUB.topic].log) == 10  # nothing delivered yet: all kept
    for delivery in await broker.fetch("c", [SUB], limit=10, timeout=0):
        assert await broker.commit(delivery) is CommitStatus.OK
    await broker.publish([Message(SUB.topic, "m10", b"x")])
    assert [e.message_id for e in broker._topics[SUB.topic].log] == ["m8", "m9", "m10"]


async def test_without_maxlen_memory_keeps_only_what_some_group_still_needs() -> None:
    """An embedded broker running for days must not grow without bound: settled entries are compacted."""
    from brokers.memory_records import COMPACT_EVERY

    broker = await virtual_broker(FakeClock())
    total = COMPACT_EVERY * 2
    await broker.publish([Message(SUB.topic, f"m{n}", b"x") for n in range(total)])
    assert len(broker._topics[SUB.topic].log) == total  # undelivered: all kept
    while deliveries := await broker.fetch("c", [SUB], limit=500, timeout=0):
        for delivery in deliveries:
            assert await broker.commit(delivery) is CommitStatus.OK
    await broker.publish([Message(SUB.topic, f"n{n}", b"x") for n in range(COMPACT_EVERY)])
    assert len(broker._topics[SUB.topic].log) <= COMPACT_EVERY
