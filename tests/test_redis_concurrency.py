"""Many concurrent handlers on one Redis broker: more than its connection pool.

redis-py's asyncio pool raises ``MaxConnectionsError`` instead of waiting when
every connection is busy, which turned a busy worker's commits into errors and
redeliveries. Commits now share pipelined round trips and other calls wait for
a free connection; a run far above the pool size loses nothing and logs no
error.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import redis.asyncio as aioredis

from brokers import BrokerError, CommitStatus, Delivery, Message, StateWrite, Subscription
from brokers.redis_streams import RedisStreamsBroker
from choreo import App, Context
from choreo.testing import run_apps
from tests.deliveries import collect
from tests.redis_server import RedisServer

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

EVENTS = 2000
CONCURRENCY = 300  # above the command pool (32) and redis-py's default pool (100)



async def test_concurrency_above_the_pool_size_loses_nothing(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    handled: Counter[int] = Counter()
    arrived: Counter[int] = Counter()
    app = App("pool")

    @app.on_event("pool.start")
    @app.emits("pool.next")
    async def first(data: dict[str, Any], ctx: Context) -> dict[str, Any]:
        # Every handler holds a plain command (not a commit) at the same time.
        await ctx.get_state(f"n{data['n']}")
        await asyncio.sleep(0.01)
        handled[data["n"]] += 1
        return {}

    @app.on_event("pool.next")
    async def last(data: dict[str, Any]) -> None:
        arrived[data["n"]] += 1

    caplog.set_level(logging.WARNING)
    async with run_apps(app, broker=server.url, concurrency=CONCURRENCY) as env:
        for start in range(0, EVENTS, 500):
            await asyncio.gather(*(env.publish("pool.start", {"n": n}) for n in range(start, start + 500)))
        await env.settle(timeout=60)
    assert sorted(handled) == list(range(EVENTS)) and set(handled.values()) == {1}
    assert sorted(arrived) == list(range(EVENTS)) and set(arrived.values()) == {1}
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
    assert not [r for r in caplog.records if "redeliver" in r.getMessage()]


SUB = Subscription("pool.start", "pool.first")


@asynccontextmanager
async def handed_out(server: RedisServer, count: int) -> AsyncIterator[tuple[RedisStreamsBroker, Any, list[Delivery]]]:
    """A broker holding ``count`` fresh deliveries of ``SUB``, and a plain client beside it."""
    broker = RedisStreamsBroker(server.url)
    client = aioredis.from_url(server.url)
    await broker.connect()
    try:
        await broker.subscribe([SUB])
        await broker.publish([Message(SUB.topic, f"m{n}", b"{}") for n in range(count)])
        deliveries = await collect(broker, "a", [SUB], count, timeout=10)
        assert len(deliveries) == count
        yield broker, client, deliveries
    finally:
        await broker.close()
        await client.aclose()


async def test_concurrent_commits_are_each_fenced(server: RedisServer) -> None:
    """Commits sent in one batch still settle one by one: a stale
    delivery in the middle of the batch is refused, the others go through."""
    async with handed_out(server, 400) as (broker, client, deliveries):
        stale = deliveries[200]
        # Another consumer claims one entry: the original holder's lease on it is gone.
        await client.xclaim(f"choreo:{SUB.topic}", SUB.group, "b", 0, [stale.entry_id])
        statuses = await asyncio.gather(*(broker.commit(d) for d in deliveries))
        assert statuses[200] is CommitStatus.LEASE_LOST
        assert Counter(statuses) == {CommitStatus.OK: 399, CommitStatus.LEASE_LOST: 1}
        assert await client.xpending(f"choreo:{SUB.topic}", SUB.group) == {
            "pending": 1, "min": stale.entry_id.encode(), "max": stale.entry_id.encode(),
            "consumers": [{"name": b"b", "pending": 1}],
        }


async def test_a_failing_commit_leaves_the_rest_of_its_batch_alone(server: RedisServer) -> None:
    """A commit that Redis refuses mid-script (here: a state key that is not a
    hash) fails for its caller only; the commits batched with it are applied."""
    async with handed_out(server, 100) as (broker, client, deliveries):
        await client.set("choreo:_state:broken", "not a hash")
        broken = deliveries[50]

        async def settle(delivery: Delivery) -> CommitStatus | str:
            state = [StateWrite("broken", b"v", 0)] if delivery is broken else []
            try:
                return await broker.commit(delivery, state=state)
            except BrokerError as exc:
                return str(exc)

        outcomes = await asyncio.gather(*(settle(d) for d in deliveries))
        assert "WRONGTYPE" in str(outcomes[50])
        assert Counter(o for i, o in enumerate(outcomes) if i != 50) == {CommitStatus.OK: 99}
        pending = await client.xpending(f"choreo:{SUB.topic}", SUB.group)
        assert pending["pending"] == 1 and pending["min"] == broken.entry_id.encode()
