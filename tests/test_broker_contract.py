"""The transport contract (``brokers.base``) that every broker adapter passes.

Every test runs once per broker kind through the ``broker`` / ``broker_url``
fixtures. Waits are deadlines around ``fetch`` (never bare sleeps); tests about
leases use ``fast_broker_url`` (visibility_timeout=0.5, max_deliveries=3).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import anyio
import pytest

import brokers
from brokers import (
    Broker,
    BrokerError,
    CommitStatus,
    Delivery,
    GroupBacklog,
    GroupCursor,
    HistoryEntry,
    Inspection,
    Message,
    PendingEntry,
    State,
    StateWrite,
    Subscription,
    Transport,
    Versioned,
)
from tests.deliveries import collect

TOPIC = "order.created"
G1 = Subscription(TOPIC, "inventory.reserve")
G2 = Subscription(TOPIC, "billing.charge")
OUT = Subscription("inventory.reserved", "shipping.ship")


@asynccontextmanager
async def connected(url: str) -> AsyncIterator[Broker]:
    instance = brokers.from_url(url)
    await instance.connect()
    try:
        yield instance
    finally:
        await instance.close()


async def assert_nothing(broker: Broker, consumer: str, subs: Sequence[Subscription], wait: float = 0.1) -> None:
    assert await broker.fetch(consumer, subs, limit=10, timeout=wait) == []


def msg(n: int, topic: str = TOPIC, **kwargs: object) -> Message:
    return Message(topic, f"m{n}", f"body-{n}".encode(), **kwargs)  # type: ignore[arg-type]


# -- groups and consumers ------------------------------------------------------


async def test_every_group_sees_every_message(broker: Broker) -> None:
    """Each group subscribed to a topic receives every message, in publish order."""
    await broker.subscribe([G1, G2])
    await broker.publish([msg(1), msg(2), msg(3)])
    for sub in (G1, G2):
        got = await collect(broker, "c1", [sub], 3)
        assert [d.body for d in got] == [b"body-1", b"body-2", b"body-3"]
        for delivery in got:
            assert await broker.commit(delivery) is CommitStatus.OK
        await assert_nothing(broker, "c1", [sub])


async def test_delivery_carries_topic_group_ids_body_and_count(broker: Broker) -> None:
    """A delivery names its topic, group, consumer and ids, with the exact bytes and a count of 1."""
    await broker.subscribe([G1])
    body = bytes(range(256))
    await broker.publish([Message(TOPIC, "evt-1", body)])
    (delivery,) = await collect(broker, "worker-a", [G1], 1)
    assert (delivery.topic, delivery.group, delivery.consumer) == (TOPIC, G1.group, "worker-a")
    assert delivery.message_id == "evt-1"
    assert delivery.body == body
    assert delivery.deliveries == 1
    assert isinstance(delivery.entry_id, str) and delivery.entry_id


async def test_consumers_of_one_group_compete(broker: Broker) -> None:
    """Within a group each message goes to exactly one consumer."""
    await broker.subscribe([G1])
    await broker.publish([msg(n) for n in range(4)])
    first = await broker.fetch("c1", [G1], limit=2, timeout=1)
    assert len(first) == 2
    second = await collect(broker, "c2", [G1], 2)
    assert {d.message_id for d in first} | {d.message_id for d in second} == {f"m{n}" for n in range(4)}
    assert not {d.entry_id for d in first} & {d.entry_id for d in second}
    await assert_nothing(broker, "c1", [G1])
    await assert_nothing(broker, "c3", [G1])


async def test_new_group_starts_at_end_of_topic(broker: Broker) -> None:
    """A group created after a message was published never sees that message."""
    await broker.subscribe([G1])
    await broker.publish([msg(1)])
    await broker.subscribe([G2])
    await broker.publish([msg(2)])
    assert [d.message_id for d in await collect(broker, "c", [G2], 2, timeout=0.5)] == ["m2"]
    assert [d.message_id for d in await collect(broker, "c", [G1], 2)] == ["m1", "m2"]


async def test_subscribe_is_idempotent_and_keeps_position(broker: Broker) -> None:
    """Subscribing an existing group again does not move it to the end."""
    await broker.subscribe([G1])
    await broker.publish([msg(1)])
    await broker.subscribe([G1, G1])
    assert [d.message_id for d in await collect(broker, "c", [G1], 1)] == ["m1"]


async def test_fetch_respects_limit(broker: Broker) -> None:
    """A fetch never hands out more than ``limit`` deliveries."""
    await broker.subscribe([G1])
    await broker.publish([msg(n) for n in range(5)])
    assert len(await broker.fetch("c", [G1], limit=3, timeout=1)) == 3
    assert len(await broker.fetch("c", [G1], limit=3, timeout=1)) == 2


async def test_a_backlog_fetched_a_few_at_a_time_comes_out_whole(broker: Broker) -> None:
    """Many transactions' messages (on Redis Cluster, spread over every
    partition), fetched a few at a time as a busy worker asks for the slots
    its handlers freed: no fetch hands out more than its limit, each message
    comes out once, and once committed the group is idle."""
    await broker.subscribe([G1])
    await broker.publish([msg(n, key=f"order-{n}") for n in range(300)])
    seen: list[str] = []
    deadline = time.monotonic() + 30
    while len(seen) < 300 and time.monotonic() < deadline:
        got = await broker.fetch("c", [G1], limit=1 + len(seen) % 7, timeout=1)
        assert len(got) <= 1 + len(seen) % 7
        for delivery in got:
            assert await broker.commit(delivery) is CommitStatus.OK
        seen += [d.message_id for d in got]
    assert sorted(seen) == sorted(f"m{n}" for n in range(300))
    assert await broker.fetch("c", [G1], limit=10, timeout=0.2) == []
    assert (await broker.backlog([G1]))[0].idle


async def test_fetch_waits_for_a_message_published_later(broker: Broker) -> None:
    """A waiting fetch returns as soon as a message arrives, not at its timeout."""
    await broker.subscribe([G1])

    async def publish_later() -> None:
        await anyio.sleep(0.1)  # the message must arrive while the fetch waits
        await broker.publish([msg(1)])

    started = time.monotonic()
    async with anyio.create_task_group() as tg:
        tg.start_soon(publish_later)
        got = await broker.fetch("c", [G1], limit=1, timeout=5)
    assert [d.message_id for d in got] == ["m1"]
    assert time.monotonic() - started < 2


async def test_fetch_returns_nothing_after_its_timeout(broker: Broker) -> None:
    """With nothing to hand out, fetch returns an empty list after about ``timeout``."""
    await broker.subscribe([G1])
    started = time.monotonic()
    assert await broker.fetch("c", [G1], limit=1, timeout=0.2) == []
    assert 0.15 <= time.monotonic() - started < 2


async def test_fetch_is_fair_across_subscriptions(broker: Broker) -> None:
    """A busy topic does not starve a quiet one fetched by the same consumer."""
    quiet = Subscription("payment.failed", "ops.alert")
    await broker.subscribe([G1, quiet])
    await broker.publish([msg(n) for n in range(10)])
    await broker.publish([msg(99, topic=quiet.topic)])
    seen: list[str] = []
    for _ in range(3):
        seen += [d.topic for d in await broker.fetch("c", [G1, quiet], limit=2, timeout=1)]
    assert quiet.topic in seen


# -- leases, redelivery, dead letters -------------------------------------------


async def test_uncommitted_delivery_is_redelivered_after_visibility_timeout(fast_broker_url: str) -> None:
    """A delivery not committed within the visibility timeout goes to another consumer."""
    async with connected(fast_broker_url) as broker:
        await broker.subscribe([G1])
        await broker.publish([msg(1)])
        (first,) = await broker.fetch("c1", [G1], limit=1, timeout=1)
        (second,) = await collect(broker, "c2", [G1], 1)
        assert second.entry_id == first.entry_id
        assert (second.message_id, second.body, second.deliveries) == ("m1", b"body-1", 2)
        assert second.consumer == "c2"
        assert await broker.commit(second) is CommitStatus.OK
        await assert_nothing(broker, "c3", [G1], wait=0.7)


async def test_extend_keeps_delivery_from_being_reclaimed(fast_broker_url: str) -> None:
    """A consumer that renews its lease keeps the delivery past the visibility timeout."""
    async with connected(fast_broker_url) as broker:
        await broker.subscribe([G1])
        await broker.publish([msg(1)])
        (delivery,) = await broker.fetch("c1", [G1], limit=1, timeout=1)
        for _ in range(5):  # about 1.25 s in all, well past the 0.5 s lease
            assert await broker.extend(delivery)
            await assert_nothing(broker, "c2", [G1], wait=0.25)
        assert await broker.commit(delivery) is CommitStatus.OK


async def test_extend_many_keeps_many_deliveries_from_being_reclaimed(broker_url: str) -> None:
    """One call renews every lease a consumer holds (spread over the partitions of a cluster), and
    a second consumer reclaims none of them past the visibility timeout."""
    url = broker_url + ("&" if "?" in broker_url else "?") + "visibility_timeout=1"
    async with connected(url) as broker:
        await broker.subscribe([G1])
        await broker.publish([msg(n, key=f"k{n}") for n in range(200)])
        held = await collect(broker, "c1", [G1], 200)
        assert len(held) == 200
        assert await broker.extend_many([]) == []
        for _ in range(4):  # about 1.6 s in all, well past the 1 s lease
            assert await broker.extend_many(held) == [True] * 200
            await assert_nothing(broker, "c2", [G1], wait=0.4)
        assert [await broker.commit(d) for d in held] == [CommitStatus.OK] * 200


async def test_extend_many_reports_a_delivery_taken_over_and_renews_the_rest(fast_broker_url: str) -> None:
    """A lease that ran out and was reclaimed is ``False`` in its place; the others in the same call
    are renewed and their consumer still commits them."""
    async with connected(fast_broker_url) as broker:
        await broker.subscribe([G1])
        await broker.publish([msg(n, key=f"k{n}") for n in range(5)])
        held = await collect(broker, "c1", [G1], 5)
        kept = held[:2] + held[3:]

        async def renew() -> None:
            while True:
                assert await broker.extend_many(kept) == [True] * 4
                await asyncio.sleep(0.1)

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(renew)
            (stolen,) = await collect(broker, "c2", [G1], 1)
            tasks.cancel_scope.cancel()
        assert (stolen.entry_id, stolen.deliveries) == (held[2].entry_id, 2)
        assert await broker.extend_many(held) == [True, True, False, True, True]
        assert await broker.extend(held[2]) is False
        assert [await broker.commit(d) for d in kept] == [CommitStatus.OK] * 4
        assert await broker.commit(held[2]) is CommitStatus.LEASE_LOST
        assert await broker.commit(stolen) is CommitStatus.OK
        await assert_nothing(broker, "c3", [G1], wait=0.7)


async def test_delivery_past_max_deliveries_is_dead_lettered(fast_broker_url: str) -> None:
    """A message handed out max_deliveries times without a commit becomes a dead letter."""
    async with connected(fast_broker_url) as broker:
        await broker.subscribe([G1])
        await broker.publish([msg(1)])
        seen: list[Delivery] = []
        deadline = time.monotonic() + 5
        while not await broker.dead_letters() and time.monotonic() < deadline:
            seen += await broker.fetch(f"c{len(seen)}", [G1], limit=1, timeout=0.2)
        assert [d.deliveries for d in seen] == [1, 2, 3]
        (record,) = await broker.dead_letters()
        assert record.reason == "max deliveries exceeded"
        assert (record.topic, record.group, record.message_id) == (TOPIC, G1.group, "m1")
        assert (record.body, record.deliveries) == (b"body-1", 3)
        (backlog,) = await broker.backlog([G1])
        assert backlog.idle
        assert await broker.commit(seen[-1]) is CommitStatus.LEASE_LOST


async def test_commit_by_stale_consumer_is_refused(fast_broker_url: str) -> None:
    """A consumer whose delivery was reclaimed gets LEASE_LOST and none of its effects happen."""
    async with connected(fast_broker_url) as broker:
        await broker.subscribe([G1, OUT])
        await broker.publish([msg(1)])
        (stale,) = await broker.fetch("c1", [G1], limit=1, timeout=1)
        (fresh,) = await collect(broker, "c2", [G1], 1)
        status = await broker.commit(stale, publish=[msg(2, topic=OUT.topic)], state=[StateWrite("saga:1", b"x", 0)])
        assert status is CommitStatus.LEASE_LOST
        assert await broker.extend(stale) is False
        assert await broker.get_state("saga:1") is None
        await assert_nothing(broker, "c", [OUT])
        assert await broker.commit(fresh) is CommitStatus.OK


async def test_commit_publishes_and_acks_atomically(broker: Broker) -> None:
    """An OK commit acks the delivery, publishes its messages and writes its state together."""
    await broker.subscribe([G1, OUT])
    await broker.publish([msg(1)])
    (delivery,) = await collect(broker, "c", [G1], 1)
    status = await broker.commit(
        delivery, publish=[msg(2, topic=OUT.topic), msg(3, topic=OUT.topic)], state=[StateWrite("k", b"v", 0)]
    )
    assert status is CommitStatus.OK
    assert [d.message_id for d in await collect(broker, "c", [OUT], 2)] == ["m2", "m3"]
    assert await broker.get_state("k") == Versioned(b"v", 1)
    assert (await broker.backlog([G1]))[0].idle
    assert await broker.commit(delivery) is CommitStatus.LEASE_LOST


async def test_state_compare_and_set(broker: Broker) -> None:
    """State writes need the current version; a CONFLICT leaves state, ack and publishes untouched."""
    assert await broker.commit(state=[StateWrite("saga:1", b"v1", 0)]) is CommitStatus.OK
    assert await broker.get_state("saga:1") == Versioned(b"v1", 1)
    assert await broker.commit(state=[StateWrite("saga:1", b"again", 0)]) is CommitStatus.CONFLICT

    await broker.subscribe([G1, OUT])
    # Keyed like the state it goes on to write: a broker with partitions keeps
    # one transaction's messages and state together (nothing changes elsewhere).
    await broker.publish([msg(1, key="saga:1")])
    (delivery,) = await collect(broker, "c", [G1], 1)
    writes = [StateWrite("saga:2", b"new", 0), StateWrite("saga:1", b"v2", 7)]
    status = await broker.commit(delivery, publish=[msg(2, topic=OUT.topic)], state=writes)
    assert status is CommitStatus.CONFLICT
    assert await broker.get_state("saga:2") is None
    assert await broker.get_state("saga:1") == Versioned(b"v1", 1)
    await assert_nothing(broker, "c", [OUT])
    assert (await broker.backlog([G1]))[0].pending == 1

    writes = [StateWrite("saga:2", b"new", 0), StateWrite("saga:1", b"v2", 1)]
    assert await broker.commit(delivery, publish=[msg(2, topic=OUT.topic)], state=writes) is CommitStatus.OK
    assert await broker.list_state("saga:") == {"saga:1": Versioned(b"v2", 2), "saga:2": Versioned(b"new", 1)}
    assert [d.message_id for d in await collect(broker, "c", [OUT], 1)] == ["m2"]

    assert await broker.commit(state=[StateWrite("saga:1", None, 2)]) is CommitStatus.OK
    assert await broker.get_state("saga:1") is None
    assert await broker.list_state("saga:") == {"saga:2": Versioned(b"new", 1)}
    assert await broker.list_state("other:") == {}


async def test_concurrent_commits_each_get_their_own_outcome(broker: Broker) -> None:
    """Commits made at once (which an adapter may send together) are applied or refused
    each on its own: a conflict or an invalid name fails only its caller."""
    await broker.subscribe([G1])
    assert await broker.commit(state=[StateWrite("taken", b"v", 0)]) is CommitStatus.OK

    async def commit(n: int) -> CommitStatus:
        if n == 3:  # loses its compare-and-set
            return await broker.commit(publish=[msg(n)], state=[StateWrite("taken", b"again", 0)])
        if n == 5:  # refused before anything is written
            return await broker.commit(publish=[msg(n), msg(n + 100, topic="bad topic!")])
        return await broker.commit(publish=[msg(n)], state=[StateWrite(f"k{n}", b"v", 0)])

    outcomes = await asyncio.gather(*(commit(n) for n in range(20)), return_exceptions=True)
    assert outcomes[3] is CommitStatus.CONFLICT
    assert isinstance(outcomes[5], BrokerError)
    assert all(outcomes[n] is CommitStatus.OK for n in range(20) if n not in (3, 5))
    delivered = sorted(d.message_id for d in await collect(broker, "c", [G1], 18))
    assert delivered == sorted(f"m{n}" for n in range(20) if n not in (3, 5))
    assert set(await broker.list_state("k")) == {f"k{n}" for n in range(20) if n not in (3, 5)}
    await assert_nothing(broker, "c", [G1])


# -- delays, targeting, dedupe ------------------------------------------------


async def test_delayed_message_arrives_after_delay(broker: Broker) -> None:
    """A message with a delay is not deliverable before the delay has passed."""
    await broker.subscribe([G1])
    started = time.monotonic()
    await broker.publish([msg(1, delay=0.4)])
    await assert_nothing(broker, "c", [G1], wait=0.05)
    assert await broker.backlog([G1]) == [GroupBacklog(TOPIC, G1.group, ready=0, pending=0, delayed=1)]
    (delivery,) = await collect(broker, "c", [G1], 1)
    assert delivery.message_id == "m1"
    assert time.monotonic() - started >= 0.35


async def test_group_targeted_message_reaches_only_that_group(broker: Broker) -> None:
    """A message published with ``group`` is delivered to that group of its topic only."""
    await broker.subscribe([G1, G2])
    await broker.publish([msg(1, group=G1.group)])
    assert (await broker.backlog([G2]))[0].idle
    assert [d.message_id for d in await collect(broker, "c", [G1], 1)] == ["m1"]
    await assert_nothing(broker, "c", [G2])


async def test_duplicate_message_id_settled_once_per_group(broker: Broker) -> None:
    """A message id already settled in a group comes back there marked as a
    duplicate (never dropped unseen); its commit acks it and applies nothing.
    Other groups get both copies as ordinary deliveries."""
    await broker.subscribe([G1, G2, OUT])
    await broker.publish([msg(1)])
    (first,) = await collect(broker, "c", [G1], 1)
    assert not first.duplicate
    assert await broker.commit(first) is CommitStatus.OK
    await broker.publish([msg(1)])
    (again,) = await collect(broker, "c", [G1], 1)
    assert again.duplicate and again.message_id == "m1" and again.body == b"body-1"
    assert await broker.commit(again, publish=[msg(2, topic=OUT.topic)]) is CommitStatus.DUPLICATE
    await assert_nothing(broker, "c", [G1, OUT])
    assert (await broker.backlog([G1]))[0].idle
    assert [(d.message_id, d.duplicate) for d in await collect(broker, "c", [G2], 2)] == [("m1", False)] * 2


async def test_a_duplicate_can_still_be_dead_lettered(broker: Broker) -> None:
    """A delivery marked duplicate whose body is another message (a reused id)
    is dead-lettered by its consumer: the dead letter is kept, never refused."""
    await broker.subscribe([G1])
    await broker.publish([msg(1)])
    (first,) = await collect(broker, "c", [G1], 1)
    assert await broker.commit(first) is CommitStatus.OK
    await broker.publish([Message(TOPIC, "m1", b"another message")])
    (again,) = await collect(broker, "c", [G1], 1)
    assert again.duplicate
    assert await broker.commit(again, dead_letter="id mismatch") is CommitStatus.OK
    [dead] = await broker.dead_letters()
    assert (dead.body, dead.reason, dead.group) == (b"another message", "id mismatch", G1.group)
    assert (await broker.backlog([G1]))[0].idle


async def fetch_while_waiting(broker: Broker, subs: Sequence[Subscription], *messages: Message,
                              max_size: int | None = None) -> list[Delivery]:
    """A fetch that has read every subscription to its end and waits when
    ``messages`` are published (on Redis: blocked in XREAD)."""
    await assert_nothing(broker, "c", subs)

    async def publish_later() -> None:
        await anyio.sleep(0.2)  # the messages must arrive while the fetch waits
        await broker.publish(list(messages))

    async with anyio.create_task_group() as tg:
        tg.start_soon(publish_later)
        got = await broker.fetch("c", subs, limit=10, timeout=5, max_size=max_size)
    return got


async def test_a_duplicate_arriving_while_a_fetch_waits_is_handed_out_marked(broker: Broker) -> None:
    """The wait that wakes on new entries marks duplicates as a plain read does."""
    await broker.subscribe([G1])
    await broker.publish([msg(1)])
    (first,) = await collect(broker, "c", [G1], 1)
    assert await broker.commit(first) is CommitStatus.OK
    got = await fetch_while_waiting(broker, [G1], msg(1), msg(2))
    got += await collect(broker, "c", [G1], 2 - len(got))
    assert [(d.message_id, d.duplicate, d.body) for d in got] == [("m1", True, b"body-1"), ("m2", False, b"body-2")]
    assert [await broker.commit(d) for d in got] == [CommitStatus.DUPLICATE, CommitStatus.OK]
    assert (await broker.backlog([G1]))[0].idle


async def test_an_oversized_message_arriving_while_a_fetch_waits_is_dead_lettered(broker: Broker) -> None:
    """The wait that wakes on new entries dead-letters what is over the
    consumer's size limit, with its reason, and hands out the rest."""
    await broker.subscribe([G1])
    big = Message(TOPIC, "big", b"x" * 200)
    got = await fetch_while_waiting(broker, [G1], big, msg(1), max_size=100)
    got += await collect(broker, "c", [G1], 1 - len(got))
    assert [d.message_id for d in got] == ["m1"]
    assert await broker.commit(got[0]) is CommitStatus.OK
    [dead] = await broker.dead_letters()
    assert (dead.message_id, dead.group, dead.deliveries) == ("big", G1.group, 1)
    assert dead.reason == "oversized entry: 200 bytes, over the 100-byte limit"
    assert (await broker.backlog([G1]))[0].idle


# -- where a new group starts --------------------------------------------------


async def test_groups_on_a_topic_nobody_reads_yet_start_at_its_beginning(broker: Broker) -> None:
    """Messages published before the first consumers subscribed reach every group created then."""
    await broker.publish([msg(1), msg(2)])
    await broker.subscribe([G1, G2])
    for sub in (G1, G2):
        assert [d.message_id for d in await collect(broker, "c", [sub], 2)] == ["m1", "m2"]


async def test_a_group_added_beside_others_starts_at_the_end(broker: Broker) -> None:
    """On a topic other groups already read, a new group sees new messages only."""
    await broker.subscribe([G1])
    await broker.publish([msg(1)])
    await broker.subscribe([G2])
    await broker.publish([msg(2)])
    assert [d.message_id for d in await collect(broker, "c", [G2], 2, timeout=0.5)] == ["m2"]
    assert [d.message_id for d in await collect(broker, "c", [G1], 2)] == ["m1", "m2"]


async def test_start_beginning_replays_history_and_start_end_skips_it(broker: Broker) -> None:
    """``start="beginning"`` takes what the topic holds even beside other groups;
    ``start="end"`` skips it even on a topic nobody reads."""
    await broker.publish([msg(1, topic=OUT.topic)])
    ending = Subscription(OUT.topic, "audit.tail", start="end")
    await broker.subscribe([ending])
    await broker.subscribe([G1])
    await broker.publish([msg(2), msg(3, topic=OUT.topic)])
    replaying = Subscription(TOPIC, "audit.replay", start="beginning")
    await broker.subscribe([replaying])
    assert [d.message_id for d in await collect(broker, "c", [replaying], 1)] == ["m2"]
    assert [d.message_id for d in await collect(broker, "c", [ending], 2, timeout=0.5)] == ["m3"]


async def test_an_existing_group_keeps_its_position_whatever_its_start(broker: Broker) -> None:
    """Subscribing again (a restart) never moves a group."""
    await broker.subscribe([G1])
    await broker.publish([msg(1)])
    (first,) = await collect(broker, "c", [G1], 1)
    assert await broker.commit(first) is CommitStatus.OK
    await broker.subscribe([Subscription(G1.topic, G1.group, start="beginning")])
    await assert_nothing(broker, "c", [G1])


def test_a_subscription_start_is_one_of_three() -> None:
    with pytest.raises(ValueError, match="not one of auto, beginning, end"):
        Subscription(TOPIC, "g", start="latest")  # type: ignore[arg-type]


async def test_concurrent_copies_of_one_message_id_commit_once(fast_broker_url: str) -> None:
    """Two copies of one id (a producer's retried publish) handed out before
    either settled: only the first commit takes effect; the second is refused
    as a duplicate, writes nothing, and nothing is left pending."""
    async with connected(fast_broker_url) as broker:
        await broker.subscribe([G1, OUT])
        await broker.publish([msg(1)])
        await broker.publish([msg(1)])
        (first,) = await broker.fetch("c1", [G1], limit=1, timeout=1)
        (second,) = await broker.fetch("c2", [G1], limit=1, timeout=1)
        assert (first.message_id, second.message_id) == ("m1", "m1")
        assert await broker.commit(first, publish=[msg(2, topic=OUT.topic)]) is CommitStatus.OK
        status = await broker.commit(second, publish=[msg(3, topic=OUT.topic)], state=[StateWrite("k", b"x", 0)])
        assert status is CommitStatus.DUPLICATE
        assert await broker.get_state("k") is None
        assert [d.message_id for d in await broker.fetch("c", [OUT], limit=2, timeout=0.3)] == ["m2"]
        await assert_nothing(broker, "c3", [G1], wait=0.8)
        assert (await broker.backlog([G1]))[0].idle


async def test_retry_with_done_false_redelivers_same_id(broker: Broker) -> None:
    """A commit with done=False plus a delayed republish to the group delivers the same id again."""
    await broker.subscribe([G1, G2])
    await broker.publish([msg(1)])
    (delivery,) = await collect(broker, "c", [G1], 1)
    retry = Message(TOPIC, delivery.message_id or "", delivery.body, delay=0.2, group=G1.group)
    assert await broker.commit(delivery, publish=[retry], done=False) is CommitStatus.OK
    assert await broker.backlog([G1]) == [GroupBacklog(TOPIC, G1.group, ready=0, pending=0, delayed=1)]
    (again,) = await collect(broker, "c", [G1], 1)
    assert (again.message_id, again.body) == ("m1", b"body-1")
    assert again.entry_id != delivery.entry_id
    assert await broker.commit(again) is CommitStatus.OK
    assert [d.message_id for d in await collect(broker, "c", [G2], 2, timeout=0.5)] == ["m1"]


async def test_dead_letter_keeps_body_reason_group_and_replay_reprocesses(broker: Broker) -> None:
    """A dead letter keeps the raw bytes and why; replay hands it to its group again, and only to it."""
    await broker.subscribe([G1, G2])
    raw = b"\xff\xfe\x00not json"
    await broker.publish([Message(TOPIC, "evt-9", raw)])
    (delivery,) = await collect(broker, "c", [G1], 1)
    assert await broker.commit(delivery, dead_letter="undecodable: bad utf-8") is CommitStatus.OK
    (other,) = await collect(broker, "c", [G2], 1)
    assert await broker.commit(other) is CommitStatus.OK

    (record,) = await broker.dead_letters()
    assert (record.topic, record.group, record.message_id) == (TOPIC, G1.group, "evt-9")
    assert (record.body, record.reason, record.deliveries) == (raw, "undecodable: bad utf-8", 1)
    assert abs(record.dead_at - time.time()) < 60
    await assert_nothing(broker, "c", [G1])

    assert await broker.replay(record.id) is True
    assert await broker.dead_letters() == []
    (replayed,) = await collect(broker, "c", [G1], 1)
    assert (replayed.message_id, replayed.body) == ("evt-9", raw)
    assert await broker.commit(replayed) is CommitStatus.OK
    await assert_nothing(broker, "c", [G2])
    assert await broker.replay(record.id) is False


async def test_purge(broker: Broker) -> None:
    """Purging removes the named dead letters, or all of them, and says how many."""
    await broker.subscribe([G1])
    await broker.publish([msg(n) for n in range(3)])
    for delivery in await collect(broker, "c", [G1], 3):
        assert await broker.commit(delivery, dead_letter="bad") is CommitStatus.OK
    records = await broker.dead_letters()
    assert [r.message_id for r in records] == ["m0", "m1", "m2"]
    assert len(await broker.dead_letters(limit=2)) == 2
    assert await broker.purge_dead_letters([records[1].id, "no-such-id"]) == 1
    assert [r.message_id for r in await broker.dead_letters()] == ["m0", "m2"]
    assert await broker.purge_dead_letters() == 2
    assert await broker.dead_letters() == []
    assert await broker.purge_dead_letters() == 0


# -- inspection, validation, retention --------------------------------------------


async def test_backlog_counts_ready_pending_delayed(broker: Broker) -> None:
    """Backlog reports per subscription, in order, what is ready, pending and delayed."""
    await broker.subscribe([G1, G2])
    await broker.publish([msg(1), msg(2), msg(3), msg(4, delay=30), msg(5, delay=30, group=G2.group)])
    assert len(await broker.fetch("c", [G1], limit=1, timeout=1)) == 1
    assert await broker.backlog([G2, G1]) == [
        GroupBacklog(TOPIC, G2.group, ready=3, pending=0, delayed=2),
        GroupBacklog(TOPIC, G1.group, ready=2, pending=1, delayed=1),
    ]


async def test_every_adapter_plays_every_role(broker: Broker) -> None:
    """Both adapters are a Transport, a State and an Inspection, so a Broker."""
    for role in (Transport, State, Inspection, Broker):
        assert isinstance(broker, role)


async def test_history_keeps_topic_and_group_entries_with_the_delivery_ids(broker: Broker) -> None:
    """History lists what each queue holds, filtered by message id or body, under the ids deliveries carry."""
    await broker.subscribe([G1, G2])
    await broker.publish([msg(1), msg(2), msg(3, group=G1.group), msg(4, topic=OUT.topic)])
    everything = await broker.history()
    assert {(e.topic, e.group, e.message_id) for e in everything} == {
        (TOPIC, None, "m1"), (TOPIC, None, "m2"), (TOPIC, G1.group, "m3"), (OUT.topic, None, "m4")}
    assert [e.message_id for e in everything if e.topic == TOPIC and e.group is None] == ["m1", "m2"]
    (second,) = await broker.history(containing=b"body-2")
    assert (second.topic, second.group, second.message_id, second.body) == (TOPIC, None, "m2", b"body-2")
    (retry,) = await broker.history(message_id="m3")
    assert await broker.history(message_id="m3", containing=b"body-1") == []
    assert await broker.history(since=time.time() - 60) != []

    delivered = {d.message_id: d for d in await collect(broker, "c", [G1], 3)}
    assert delivered["m2"].entry_id == second.entry_id
    assert delivered["m3"].entry_id == retry.entry_id
    assert HistoryEntry(TOPIC, None, delivered["m1"].entry_id, "m1", b"body-1") in await broker.history()


def cursor(sub: Subscription, private: bool, cursors: list[GroupCursor], entry_id: str) -> GroupCursor:
    """The cursor of the queue holding ``entry_id`` (with partitions, a group has one per partition)."""
    (found,) = [c for c in cursors
                if (c.topic, c.group, c.private) == (sub.topic, sub.group, private) and c.holds(entry_id)]
    return found


async def test_cursors_tell_which_entries_each_group_was_handed(broker: Broker) -> None:
    """A group's cursor in the topic's queue and in its own queue moves as entries are handed out."""
    await broker.subscribe([G1, G2])
    await broker.publish([msg(1), msg(2), msg(3, group=G1.group)])
    ids = {e.message_id: e.entry_id for e in await broker.history()}
    assert len(await collect(broker, "c", [G1], 1)) == 1  # the topic's first entry or the group's own

    cursors = await broker.cursors()
    assert {(c.topic, c.group, c.private) for c in cursors} >= {
        (TOPIC, G1.group, False), (TOPIC, G1.group, True), (TOPIC, G2.group, False), (TOPIC, G2.group, True)}
    untouched = cursor(G2, False, cursors, ids["m1"])
    assert not untouched.handed_out(ids["m1"]) and not untouched.handed_out(ids["m2"])

    await collect(broker, "c", [G1], 2)
    cursors = await broker.cursors()
    shared, own = cursor(G1, False, cursors, ids["m1"]), cursor(G1, True, cursors, ids["m3"])
    assert shared.handed_out(ids["m1"]) and shared.handed_out(ids["m2"])
    assert own.handed_out(ids["m3"])
    await broker.publish([msg(4, group=G1.group)])
    (late,) = await broker.history(message_id="m4")
    assert not cursor(G1, True, await broker.cursors(), late.entry_id).handed_out(late.entry_id)


async def test_pending_lists_each_lease_until_it_is_committed(broker: Broker) -> None:
    """Pending names the entry, the consumer holding it and how often it was handed out."""
    await broker.subscribe([G1, G2])
    await broker.publish([msg(1), msg(2, group=G1.group)])
    taken = await collect(broker, "worker-a", [G1], 2)
    leases = await broker.pending([G2, G1])
    assert sorted(leases, key=lambda p: p.entry_id) == sorted(
        [PendingEntry(TOPIC, G1.group, d.entry_id, "worker-a", 1) for d in taken], key=lambda p: p.entry_id)
    assert len(await broker.pending([G1], limit=1)) == 1
    for delivery in taken:
        assert await broker.commit(delivery) is CommitStatus.OK
    assert await broker.pending([G1, G2, Subscription("never.published", "nobody")]) == []
    with pytest.raises(BrokerError):
        await broker.pending([Subscription("bad topic", "g")])


async def test_delayed_lists_what_waits_soonest_first(broker: Broker) -> None:
    """Delayed messages are listed with their destination, bytes and time left, until they are due."""
    await broker.subscribe([G1])
    await broker.publish([msg(1, delay=30), msg(2, delay=10, group=G1.group), msg(3)])
    later, sooner = (await broker.delayed())[::-1]
    assert (sooner.topic, sooner.group, sooner.message_id, sooner.body) == (TOPIC, G1.group, "m2", b"body-2")
    assert (later.topic, later.group, later.message_id, later.body) == (TOPIC, None, "m1", b"body-1")
    assert 5 < sooner.due_in <= 10 < later.due_in <= 30
    assert [m.message_id for m in await broker.delayed(limit=1)] == ["m2"]
    await broker.publish([msg(4, delay=0.05)])
    got = await collect(broker, "c", [G1], 2)
    assert sorted(d.message_id or "" for d in got) == ["m3", "m4"]
    assert [m.message_id for m in await broker.delayed()] == ["m2", "m1"]


async def test_invalid_topic_name_rejected(broker: Broker) -> None:
    """Hostile or malformed topic and group names raise BrokerError and publish nothing."""
    await broker.subscribe([G1])
    for bad in ("", "has space", "../etc/passwd", "x" * 201, "*", "-leading"):
        with pytest.raises(BrokerError):
            await broker.publish([msg(1), Message(bad, "m", b"")])
        with pytest.raises(BrokerError):
            await broker.subscribe([Subscription(bad, "g")])
        with pytest.raises(BrokerError):
            await broker.subscribe([Subscription(TOPIC, bad)])
    with pytest.raises(BrokerError):
        await broker.publish([msg(1, group="bad group")])
    with pytest.raises(BrokerError):
        await broker.commit(publish=[msg(1), Message("bad topic", "m", b"")])
    await assert_nothing(broker, "c", [G1])


async def test_maxlen_never_trims_pending(fast_broker_url: str) -> None:
    """Retention keeps every entry still pending in a group, even far past maxlen."""
    async with connected(fast_broker_url + "&maxlen=2") as broker:
        await broker.subscribe([G1])
        await broker.publish([msg(n) for n in range(5)])
        taken = await collect(broker, "c1", [G1], 5)
        for delivery in taken[1:]:
            assert await broker.commit(delivery) is CommitStatus.OK
        await broker.publish([msg(n) for n in range(5, 10)])
        rest = await collect(broker, "c2", [G1], 6)
        assert sorted(d.message_id or "" for d in rest) == sorted(["m0", *(f"m{n}" for n in range(5, 10))])
        (reclaimed,) = [d for d in rest if d.message_id == "m0"]
        assert (reclaimed.body, reclaimed.deliveries) == (b"body-0", 2)


async def test_maxlen_never_trims_undelivered(broker_url: str) -> None:
    """Retention keeps every entry a slow group has not been handed yet."""
    async with connected(broker_url + ("&" if "?" in broker_url else "?") + "maxlen=2") as broker:
        await broker.subscribe([G1, G2])
        for n in range(10):
            await broker.publish([msg(n)])
            for delivery in await collect(broker, "fast", [G1], 1):
                assert await broker.commit(delivery) is CommitStatus.OK
        late = await collect(broker, "slow", [G2], 10)
        assert [d.message_id for d in late] == [f"m{n}" for n in range(10)]


def test_fast_constructors_build_what_the_classes_build() -> None:
    """The delivery path's builders make values equal to the attrs constructors' (same fields, same order)."""
    from brokers.base import Delivery, Message, new_delivery, new_message

    full = Message(topic="t.a", id="id-1", body=b"{}", delay=1.5, group="g")
    assert new_message("t.a", "id-1", b"{}", 1.5, "g") == full
    assert new_message("t.a", "id-1", b"{}") == Message(topic="t.a", id="id-1", body=b"{}")
    delivery = Delivery(topic="t.a", group="g", consumer="c", entry_id="1-0", message_id="m", body=b"x", deliveries=2)
    assert new_delivery("t.a", "g", "c", "1-0", "m", b"x", 2) == delivery
