"""Retention on Redis is on by default and bounded, and never costs an entry
a group still needs.

Each test runs on a private redis-server. Streams lose the entries past their
newest ``maxlen`` and those older than ``retention``, but only below the
oldest entry that any group still has pending or has not been delivered yet;
dedupe records are bounded by count (``dedupe_max``) as well as by age.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import redis.asyncio as aioredis

from brokers import BrokerError, CommitStatus, Delivery, Message, Subscription
from brokers.options import parse_url
from brokers.redis_keys import Keys
from brokers.redis_retention import DEFAULT_MAXLEN, retention_bounds
from brokers.redis_streams import RedisStreamsBroker
from tests.deliveries import collect
from tests.redis_server import RedisServer
from tests.retention_soak import retention_soak

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

TOPIC = "order.created"
GROUPS = [Subscription(TOPIC, name) for name in ("inventory.reserve", "billing.charge", "shipping.plan")]
KEY = Keys().stream(TOPIC)


@pytest.fixture
def server(start_redis: Callable[..., RedisServer]) -> RedisServer:
    return start_redis()


@asynccontextmanager
async def connected(url: str) -> AsyncIterator[tuple[RedisStreamsBroker, aioredis.Redis]]:
    broker = RedisStreamsBroker(url)
    client = aioredis.from_url(url.split("?")[0])
    await broker.connect()
    try:
        yield broker, client
    finally:
        await broker.close()
        await client.aclose()


def messages(first: int, count: int) -> list[Message]:
    return [Message(TOPIC, f"m{n}", f"body-{n}".encode()) for n in range(first, first + count)]


def parse(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq)


async def floor(client: aioredis.Redis) -> tuple[int, int]:
    """The oldest entry some group still needs: its oldest pending entry, or the one after its
    last-delivered id, whichever is older, over every group."""
    lowest = None
    for info in await client.xinfo_groups(KEY):
        ms, seq = parse(info["last-delivered-id"])
        need = (ms, seq + 1)
        if info["pending"]:
            need = min(need, parse((await client.xpending(KEY, info["name"]))["min"]))
        lowest = need if lowest is None else min(lowest, need)
    assert lowest is not None
    return lowest


async def needed(client: aioredis.Redis) -> set[bytes]:
    """The entries some group still needs: pending in it, or past its last-delivered id."""
    keep: set[bytes] = set()
    for info in await client.xinfo_groups(KEY):
        for row in await client.xpending_range(KEY, info["name"], min="-", max="+", count=100_000):
            keep.add(row["message_id"])
        for entry_id, _ in await client.xrange(KEY, min="(" + info["last-delivered-id"].decode(), max="+"):
            keep.add(entry_id)
    return keep


def test_retention_is_on_by_default_and_off_only_when_both_bounds_are_zero() -> None:
    """Without options a stream keeps DEFAULT_MAXLEN entries for a day; 0 and 0 turn it off."""
    assert retention_bounds(parse_url("redis://h/0")[1]) == (DEFAULT_MAXLEN, 86_400_000)
    assert retention_bounds(parse_url("redis://h/0?maxlen=0")[1]) == (0, 86_400_000)
    assert retention_bounds(parse_url("redis://h/0?maxlen=0&retention=0")[1]) == (0, 0)
    # On Redis Cluster maxlen bounds the topic: each of its partitions' streams keeps a share (rounded up).
    cluster = parse_url("redis+cluster://h:7000/?maxlen=1000")[1]
    assert retention_bounds(cluster, 16) == (63, 86_400_000)
    assert retention_bounds(parse_url("redis+cluster://h:7000/")[1], 16) == (DEFAULT_MAXLEN // 16, 86_400_000)
    assert parse_url("redis://h/0?dedupe_max=10")[1].dedupe_max == 10
    for bad in ("maxlen=-1", "retention=-1", "dedupe_max=1", "retention=soon"):
        with pytest.raises(BrokerError, match=bad.split("=")[0]):
            parse_url(f"redis://h/0?{bad}")


async def test_entries_every_group_acked_are_trimmed_by_age(server: RedisServer) -> None:
    """Past ``retention`` an entry every group acked goes; one still pending in a group stays, and so
    does everything after it."""
    async with connected(f"{server.url}?retention=0.2") as (broker, client):
        await broker.subscribe(GROUPS[:2])
        await broker.publish(messages(0, 10))
        first = await collect(broker, "c", [GROUPS[0]], 10)
        second = await collect(broker, "c", [GROUPS[1]], 10)
        for delivery in first + second[:4] + second[5:]:
            assert await broker.commit(delivery) is CommitStatus.OK
        assert await broker.trim() == 0  # nothing is old enough yet
        await asyncio.sleep(0.3)
        assert await broker.trim() == 4  # m0..m3; m4 is still pending in billing.charge
        assert [e.message_id for e in await broker.history()] == [f"m{n}" for n in range(4, 10)]
        assert await broker.commit(second[4]) is CommitStatus.OK
        assert await broker.trim() == 6
        assert await client.xlen(KEY) == 0
        await broker.publish(messages(10, 1))  # and a new entry is still delivered to both groups
        assert [d.message_id for d in await collect(broker, "c", GROUPS[:2], 2)] == ["m10", "m10"]


async def test_length_bound_stops_at_an_undelivered_entry(server: RedisServer) -> None:
    """``maxlen`` trims only below what a group has not been handed yet, however long the stream."""
    async with connected(f"{server.url}?maxlen=2&retention=0") as (broker, client):
        await broker.subscribe(GROUPS[:2])
        await broker.publish(messages(0, 10))
        for delivery in await collect(broker, "c", [GROUPS[0]], 10):
            assert await broker.commit(delivery) is CommitStatus.OK
        for delivery in await collect(broker, "c", [GROUPS[1]], 6):
            assert await broker.commit(delivery) is CommitStatus.OK
        assert await broker.trim() == 6  # m6..m9 not delivered to billing.charge yet
        assert await client.xlen(KEY) == 4
        for delivery in await collect(broker, "c", [GROUPS[1]], 4):
            assert await broker.commit(delivery) is CommitStatus.OK
        assert await broker.trim() == 2
        assert await client.xlen(KEY) == 2


async def test_a_stream_far_past_maxlen_is_cut_back_to_it(server: RedisServer) -> None:
    """2,000 entries every group acked, with ``maxlen=100``: one sweep places the cut by time, the
    next one exactly, and the stream ends near 100 entries, never above."""
    async with connected(f"{server.url}?maxlen=100&retention=0") as (broker, client):
        await broker.subscribe(GROUPS[:1])
        for first in range(0, 2000, 10):
            await broker.publish(messages(first, 10))
            await asyncio.sleep(0.002)
        for delivery in await collect(broker, "c", GROUPS[:1], 2000, timeout=10):
            assert await broker.commit(delivery) is CommitStatus.OK
        await broker.trim()
        await broker.trim()
        assert 80 <= await client.xlen(KEY) <= 100


async def test_trimming_never_drops_a_pending_or_undelivered_entry(server: RedisServer) -> None:
    """Three groups read and ack at random while retention trims with tiny bounds: after every
    sweep each entry that a group still has pending or not delivered is there, and the stream
    holds nothing else beyond ``maxlen``."""
    rng = random.Random(13)
    async with connected(f"{server.url}?maxlen=5&retention=0.01") as (broker, client):
        await broker.subscribe(GROUPS)
        held: dict[str, list[Delivery]] = {sub.group: [] for sub in GROUPS}
        published = trimmed = 0
        for _ in range(60):
            count = rng.randint(0, 8)
            await broker.publish(messages(published, count))
            published += count
            for sub in GROUPS:
                if rng.random() < 0.6:
                    held[sub.group] += await broker.fetch("c", [sub], limit=rng.randint(1, 6), timeout=0)
                rng.shuffle(held[sub.group])
                k = rng.randint(0, 4)
                done, held[sub.group] = held[sub.group][:k], held[sub.group][k:]
                for delivery in done:
                    assert await broker.commit(delivery) is CommitStatus.OK
            keep = await needed(client)
            await asyncio.sleep(0.02)  # every entry is now past the retention
            trimmed += await broker.trim()
            present = {entry_id for entry_id, _ in await client.xrange(KEY)}
            assert keep <= present, "a pending or undelivered entry was trimmed"
            lowest = await floor(client)
            assert all(parse(entry_id) >= lowest for entry_id in present), "trimming stopped short"
        for sub in GROUPS:  # drain: then every entry goes
            held[sub.group] += await collect(broker, "c", [sub], published, timeout=1.0)
            for delivery in held[sub.group]:
                assert await broker.commit(delivery) is CommitStatus.OK
        await asyncio.sleep(0.02)
        trimmed += await broker.trim()
        # (fetch also trims every few seconds, so the sweeps here need not have removed all)
        assert trimmed > published // 2 and await client.xlen(KEY) == 0


async def test_worker_start_up_warns_when_retention_is_off(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """connect() (run by ``choreo worker`` at start-up) warns that memory grows without bound."""
    with caplog.at_level(logging.WARNING, logger="brokers.redis"):
        async with connected(f"{server.url}?maxlen=0&retention=0"):
            pass
    warned = [r.getMessage() for r in caplog.records if "retention is off" in r.getMessage()]
    assert len(warned) == 1 and "grows without bound" in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="brokers.redis"):
        async with connected(server.url):
            pass
    assert not [r for r in caplog.records if "retention" in r.getMessage()]


async def test_dedupe_records_are_bounded_by_count(server: RedisServer) -> None:
    """With ``dedupe_max=4`` a group keeps at most four settled ids, the newest: an old id comes
    back unmarked, a recent one marked as a duplicate."""
    async with connected(f"{server.url}?dedupe_max=4") as (broker, client):
        sub = GROUPS[0]
        await broker.subscribe([sub])
        for n in range(10):  # one commit batch each, so the buckets rotate between them
            await broker.publish(messages(n, 1))
            (delivery,) = await collect(broker, "c", [sub], 1)
            assert await broker.commit(delivery) is CommitStatus.OK
        keys = await client.keys(Keys().seen(sub.group, "*"))
        records = sum([await client.hlen(key) for key in keys if not key.endswith(b":#")])
        assert records <= 4
        await broker.publish([Message(TOPIC, "m0", b"body-0"), Message(TOPIC, "m9", b"body-9")])
        old, recent = await collect(broker, "c", [sub], 2)
        assert (old.message_id, old.duplicate) == ("m0", False)
        assert (recent.message_id, recent.duplicate) == ("m9", True)


@pytest.mark.slow
@pytest.mark.timeout(3600)
async def test_redis_memory_is_flat_over_1m_events_at_the_defaults() -> None:
    """T29: a million events through a worker at its default settings: memory stays bounded after
    warm-up, and nothing any group still needed was trimmed (missing 0, double 0)."""
    figures = await retention_soak(1_000_000)
    print(figures.line())
    assert (figures.missing, figures.double, figures.flat) == (0, 0, True), figures.line()
