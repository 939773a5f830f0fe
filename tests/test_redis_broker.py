"""Redis-only behaviour of ``RedisStreamsBroker``, proven against real faults.

Each test starts its own redis-server (``RedisServer``) so it can corrupt,
flush, kill or restart it without touching the shared session server.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import pytest
import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError

from brokers import BrokerError, CommitStatus, Delivery, Message, Subscription
from brokers.redis_streams import RedisStreamsBroker
from tests.deliveries import collect
from tests.redis_server import RedisServer

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

TOPIC = "order.created"
G1 = Subscription(TOPIC, "inventory.reserve")
G2 = Subscription(TOPIC, "billing.charge")
OUT = Subscription("inventory.reserved", "shipping.ship")
FAST = "visibility_timeout=0.3&max_deliveries=3"


@pytest.fixture
def server(start_redis: Callable[..., RedisServer]) -> RedisServer:
    """Without persistence, unlike the shared fixture: the start-up warning is under test."""
    return start_redis()



@asynccontextmanager
async def connected(url: str) -> AsyncIterator[RedisStreamsBroker]:
    broker = RedisStreamsBroker(url)
    await broker.connect()
    try:
        yield broker
    finally:
        await broker.close()


@asynccontextmanager
async def raw(server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(server.url)
    try:
        yield client
    finally:
        await client.aclose()


def msg(n: int, topic: str = TOPIC) -> Message:
    return Message(topic, f"m{n}", f"body-{n}".encode())


async def test_unreadable_entries_are_dead_lettered_on_first_delivery(server: RedisServer) -> None:
    """Entries XADDed by hand without ``body`` or ``id`` go to the dead letters at once; good ones flow."""
    async with connected(server.url) as broker:
        await broker.subscribe([G1])
        await broker.publish([msg(1)])
        server.command("XADD", f"choreo:{TOPIC}", "*", "id", "no-body")
        server.command("XADD", f"choreo:{TOPIC}", "*", "body", "no-id")
        server.command("XADD", f"choreo:{TOPIC}", "*", "junk", "x")
        await broker.publish([msg(2)])
        got = await collect(broker, "c", [G1], 2)
        assert [d.message_id for d in got] == ["m1", "m2"]
        for delivery in got:
            assert await broker.commit(delivery) is CommitStatus.OK
        records = await broker.dead_letters()
        assert [(r.message_id, r.body, r.reason, r.deliveries) for r in records] == [
            ("no-body", b"", 'unreadable entry: missing field "body"', 1),
            (None, b"no-id", 'unreadable entry: missing field "id"', 1),
            (None, b"", 'unreadable entry: missing field "id"', 1),
        ]
        assert {(r.topic, r.group) for r in records} == {(TOPIC, G1.group)}
        (backlog,) = await broker.backlog([G1])
        assert backlog.idle


async def fetch_while_blocked(broker: RedisStreamsBroker, client: aioredis.Redis, action: Callable[[], object],
                              limit: int = 10, timeout: float = 5) -> list[Delivery]:
    """A fetch that has read its streams to their end, with ``action`` run
    once it is blocked in XREAD (seen in CLIENT LIST)."""
    assert await broker.fetch("c", [G1], limit=1, timeout=0.1) == []

    async def act() -> None:
        deadline = time.monotonic() + 5
        while not any(c["cmd"] == "xread" for c in await client.client_list()):
            assert time.monotonic() < deadline, "the fetch never blocked"
            await anyio.sleep(0.01)
        action()

    async with anyio.create_task_group() as tg:
        tg.start_soon(act)
        got = await broker.fetch("c", [G1], limit=limit, timeout=timeout)
    return got


async def test_unreadable_entries_arriving_while_a_fetch_is_blocked_are_dead_lettered(server: RedisServer) -> None:
    """Entries without ``body`` or ``id`` that wake a blocked fetch are
    dead-lettered at once, with their reason; the good one is handed out."""
    async with connected(server.url) as broker, raw(server) as client:
        await broker.subscribe([G1])

        def add() -> None:
            server.command("EVAL", "redis.call('XADD', KEYS[1], '*', 'id', 'no-body');"
                           "redis.call('XADD', KEYS[1], '*', 'body', 'no-id');"
                           "redis.call('XADD', KEYS[1], '*', 'id', 'm1', 'body', 'body-1')", "1", f"choreo:{TOPIC}")

        got = await fetch_while_blocked(broker, client, add)
        got += await collect(broker, "c", [G1], 1 - len(got))
        assert [(d.message_id, d.body, d.duplicate) for d in got] == [("m1", b"body-1", False)]
        assert await broker.commit(got[0]) is CommitStatus.OK
        records = await broker.dead_letters()
        assert [(r.topic, r.group, r.message_id, r.body, r.reason, r.deliveries) for r in records] == [
            (TOPIC, G1.group, "no-body", b"", 'unreadable entry: missing field "body"', 1),
            (TOPIC, G1.group, None, b"no-id", 'unreadable entry: missing field "id"', 1),
        ]
        assert (await broker.backlog([G1]))[0].idle


async def test_a_group_destroyed_under_a_blocked_fetch_is_recreated(server: RedisServer) -> None:
    """NOGROUP met by the reads behind a blocked XREAD recreates the group;
    what is published after flows."""
    async with connected(server.url) as broker, raw(server) as client:
        await broker.subscribe([G1])

        def destroy_and_add() -> None:
            server.command("XGROUP", "DESTROY", f"choreo:{TOPIC}", G1.group)
            server.command("XADD", f"choreo:{TOPIC}", "*", "id", "m1", "body", "body-1")

        assert await fetch_while_blocked(broker, client, destroy_and_add, timeout=2) == []
        assert broker.group_recoveries == 1
        await broker.publish([msg(2)])
        assert [d.message_id for d in await collect(broker, "c", [G1], 1)] == ["m2"]


async def test_entries_past_the_limit_of_a_woken_fetch_are_handed_out_next(server: RedisServer) -> None:
    """A blocked fetch woken by more entries than its limit hands out the
    limit; the rest come with the next fetches, none twice, none lost."""
    async with connected(server.url) as broker, raw(server) as client:
        await broker.subscribe([G1])

        def add() -> None:
            server.command("EVAL", "for n = 1, 5 do redis.call('XADD', KEYS[1], '*', 'id', 'm' .. n, 'body', 'b') end",
                           "1", f"choreo:{TOPIC}")

        got = await fetch_while_blocked(broker, client, add, limit=2)
        assert len(got) == 2
        got += await collect(broker, "c", [G1], 3)
        assert [d.message_id for d in got] == ["m1", "m2", "m3", "m4", "m5"]
        for delivery in got:
            assert await broker.commit(delivery) is CommitStatus.OK
        assert (await broker.backlog([G1]))[0].idle


async def test_flushall_recreates_groups_and_keeps_consuming(server: RedisServer) -> None:
    """NOGROUP after FLUSHALL (or a destroyed group) recreates the groups; fetch neither raises nor stalls."""
    async with connected(server.url) as broker:
        await broker.subscribe([G1])
        await broker.publish([msg(1)])
        (first,) = await collect(broker, "c", [G1], 1)
        assert await broker.commit(first) is CommitStatus.OK
        server.command("FLUSHALL")
        assert await broker.fetch("c", [G1], limit=1, timeout=0.1) == []
        assert broker.group_recoveries == 1
        await broker.publish([msg(2)])
        assert [d.message_id for d in await collect(broker, "c", [G1], 1)] == ["m2"]
        server.command("XGROUP", "DESTROY", f"choreo:{TOPIC}", G1.group)
        assert await broker.fetch("c", [G1], limit=1, timeout=0.1) == []
        await broker.publish([msg(3)])
        assert [d.message_id for d in await collect(broker, "c", [G1], 1)] == ["m3"]
        assert broker.group_recoveries == 2


async def test_restart_keeps_acknowledged_messages_and_scripts_reload(fsync_server: RedisServer) -> None:
    """After kill -9 and restart from the AOF, published messages survive and commit reloads its script."""
    async with connected(fsync_server.url) as broker:
        await broker.subscribe([G1, OUT])
        await broker.publish([msg(1)])
        (before,) = await collect(broker, "c", [G1], 1)
        assert await broker.commit(before, publish=[msg(10, topic=OUT.topic)]) is CommitStatus.OK
        await broker.publish([msg(2)])

        fsync_server.kill()
        assert await broker.fetch("c", [G1], limit=1, timeout=0.2) == []
        with pytest.raises(BrokerError):
            await broker.publish([msg(3)])
        fsync_server.start()

        (after,) = await collect(broker, "c", [G1], 1, timeout=5)
        assert after.message_id == "m2"
        assert await broker.commit(after) is CommitStatus.OK
        assert [d.message_id for d in await collect(broker, "c", [OUT], 1)] == ["m10"]
        assert (await broker.backlog([G1]))[0].idle


async def test_script_flush_while_waiting_and_committing_loses_nothing(server: RedisServer) -> None:
    """An emptied script cache (SCRIPT FLUSH, failover to a fresh replica) under a waiting
    fetch and a commit batch: both load their script again and deliver, commit and publish."""
    async with connected(server.url) as broker, raw(server) as client:
        await broker.subscribe([G1, OUT])
        assert await broker.fetch("c", [G1], limit=1, timeout=0.3) == []  # drained: the next fetch waits
        await client.script_flush()
        await broker.publish([msg(1)])
        await client.script_flush()
        (delivery,) = await collect(broker, "c", [G1], 1)
        await client.script_flush()
        assert await broker.commit(delivery, publish=[msg(2, topic=OUT.topic)]) is CommitStatus.OK
        assert [d.message_id for d in await collect(broker, "c", [OUT], 1)] == ["m2"]
        assert (await broker.backlog([G1]))[0].idle


async def test_stale_consumer_after_reclaim_publishes_nothing(server: RedisServer) -> None:
    """A delivery reclaimed by XAUTOCLAIM (even by the same consumer) is fenced: its commit writes nothing."""
    async with connected(f"{server.url}?{FAST}") as broker, raw(server) as client:
        await broker.subscribe([G1, OUT])
        await broker.publish([msg(1), msg(2)])
        stale_a, stale_b = await broker.fetch("a", [G1], limit=2, timeout=1)
        reclaimed = await collect(broker, "b", [G1], 1)
        reclaimed += await collect(broker, "a", [G1], 1)
        assert sorted((d.consumer, d.deliveries) for d in reclaimed) == [("a", 2), ("b", 2)]
        for stale in (stale_a, stale_b):
            status = await broker.commit(stale, publish=[msg(9, topic=OUT.topic)])
            assert status is CommitStatus.LEASE_LOST
            assert await broker.extend(stale) is False
        assert await client.xlen(f"choreo:{OUT.topic}") == 0
        for fresh in reclaimed:
            assert await broker.commit(fresh) is CommitStatus.OK


async def test_retention_never_trims_pending_or_undelivered(server: RedisServer) -> None:
    """With maxlen, trimming stops at the oldest entry pending or undelivered in any group."""
    async with connected(f"{server.url}?maxlen=2") as broker, raw(server) as client:
        key = f"choreo:{TOPIC}"
        await broker.subscribe([G1, G2])
        await broker.publish([msg(n) for n in range(10)])
        taken = await collect(broker, "c", [G1], 10)
        for delivery in taken[3:]:
            assert await broker.commit(delivery) is CommitStatus.OK
        assert await broker.trim() == 0  # G2 has read nothing yet
        assert await client.xlen(key) == 10

        for delivery in await collect(broker, "c", [G2], 10):
            assert await broker.commit(delivery) is CommitStatus.OK
        assert await broker.trim() == 0  # m0..m2 still pending in G1
        for delivery in taken[:3]:
            assert await broker.commit(delivery) is CommitStatus.OK
        assert await broker.trim() == 8
        assert await client.xlen(key) == 2


async def test_startup_warns_when_redis_is_not_durable(server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    """connect() warns when appendonly is off (acknowledged events would die with Redis)."""
    with caplog.at_level(logging.WARNING, logger="brokers.redis"):
        async with connected(server.url):
            pass
    assert any("appendonly no" in r.getMessage() for r in caplog.records if r.name == "brokers.redis")


async def test_no_warning_for_durable_redis(fsync_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    """With appendonly yes and noeviction, connect() is quiet."""
    with caplog.at_level(logging.WARNING, logger="brokers.redis"):
        async with connected(fsync_server.url):
            pass
    assert not [r for r in caplog.records if r.name == "brokers.redis"]


async def test_outage_backs_off_and_logs_once(server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    """While Redis is down, fetch returns [] after a backoff, with one warning, not one per call."""
    async with connected(server.url) as broker:
        await broker.subscribe([G1])
        server.kill()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="brokers.redis"):
            started = time.monotonic()
            for _ in range(5):
                assert await broker.fetch("c", [G1], limit=1, timeout=0.05) == []
            assert time.monotonic() - started >= 0.2  # backed off, no hot loop
        assert len([r for r in caplog.records if r.name == "brokers.redis"]) == 1


async def test_password_never_appears_in_url_or_errors() -> None:
    """A wrong password is a BrokerError (not a silent retry) and neither it nor the URL leak it."""
    server = RedisServer(extra=("--user", "app", "on", ">s3cret-pass", "~*", "&*", "+@all"))
    try:
        server.start()
        good = f"redis://app:s3cret-pass@127.0.0.1:{server.port}/0"
        async with connected(good) as broker:
            assert "s3cret-pass" not in broker.url
            await broker.publish([msg(1)])
        bad = RedisStreamsBroker(f"redis://app:wrong-pass@127.0.0.1:{server.port}/0")
        with pytest.raises(BrokerError) as info:
            await bad.connect()
        assert "wrong-pass" not in str(info.value)
        await bad.close()
    finally:
        server.stop()


async def test_retry_to_private_stream_survives_group_subscribe_later(server: RedisServer) -> None:
    """A group-targeted message sent before the group exists is still delivered to it (private stream at 0)."""
    async with connected(server.url) as broker:
        await broker.publish([Message(TOPIC, "r1", b"retry", group=G1.group)])
        await broker.subscribe([G1, G2])
        (delivery,) = await collect(broker, "c", [G1], 1)
        assert (delivery.message_id, delivery.body) == ("r1", b"retry")
        assert await broker.commit(delivery) is CommitStatus.OK
        assert await broker.fetch("c", [G2], limit=1, timeout=0.1) == []


ACL_RULES = (
    "on >worker-pass resetkeys ~choreo:* resetchannels -@all +ping +hello +evalsha +eval"
    " +script|load +multi +exec +time +del +hget +hset +hmget +hdel +hlen +pexpire +zadd +zrem +zrange +zrangebyscore"
    " +zrangebylex +xadd +xack +xautoclaim +xclaim +xdel +xgroup|create +xinfo|groups +xlen +xpending +xrange"
    " +xrevrange +xread +xreadgroup +xtrim"
)


async def test_least_privilege_acl_user_runs_everything(server: RedisServer) -> None:
    """The ACL documented in the module works for every operation and denies FLUSHALL, CONFIG and other keys."""
    assert server.command("ACL", "SETUSER", "worker", *ACL_RULES.split()).startswith(b"OK")
    url = f"redis://worker:worker-pass@127.0.0.1:{server.port}/0?{FAST}&maxlen=1"
    async with connected(url) as broker:
        await broker.subscribe([G1, OUT])
        await broker.publish([msg(1), Message(TOPIC, "late", b"x", delay=0.05)])
        server.command("XADD", f"choreo:{TOPIC}", "*", "junk", "x")
        got = await collect(broker, "c", [G1], 2)
        assert sorted(d.message_id or "" for d in got) == ["late", "m1"]
        assert await broker.extend(got[0])
        assert await broker.commit(got[0], publish=[msg(2, topic=OUT.topic)], state=[]) is CommitStatus.OK
        assert await broker.commit(got[1], dead_letter="bad") is CommitStatus.OK
        assert await broker.trim() >= 0
        (dead, junk) = sorted(await broker.dead_letters(), key=lambda r: r.reason)
        assert await broker.replay(dead.id)
        assert (await collect(broker, "c", [G1], 1))[0].message_id == dead.message_id
        assert await broker.list_state("") == {}
        assert await broker.get_state("x") is None
        assert len(await broker.backlog([G1, OUT])) == 2
        assert await broker.purge_dead_letters([junk.id]) == 1
        assert await broker.purge_dead_letters() == 0
        client = aioredis.from_url(url.split("?")[0])
        try:
            for denied in (("FLUSHALL",), ("CONFIG", "GET", "appendonly"), ("SET", "other:key", "1")):
                with pytest.raises(NoPermissionError):
                    await client.execute_command(*denied)
        finally:
            await client.aclose()
