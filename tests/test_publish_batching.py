"""Concurrent root publishes share round trips and keep their own outcomes.

A web service publishes one event per request from many tasks at once. On
Redis, commits and publishes made while one is on the wire go out together
in one write (``brokers.redis_lines.ScriptBatcher``); each publish still gets its own
acknowledgement, status and error. These tests hold both brokers to that
through the public publishing path (``Runtime.publish`` / ``commit``).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import redis

import brokers
from brokers import CommitStatus, StateWrite
from choreo import App, Event
from choreo.errors import BrokerUnavailable, DecodeError
from choreo.testing import run_apps
from tests.redis_server import RedisServer

CALLERS = 200


def socket_reads(url: str) -> int:
    """Reads the Redis server has made from client sockets so far: one per
    round trip (more for a write over its 16 KB read buffer), one per INFO."""
    return int(redis.Redis.from_url(url).info("stats")["total_reads_processed"])


def recording_app(seen: Counter[str]) -> App:
    app = App("batching")

    @app.on_event("batch.published")
    async def record(event: Event) -> None:
        seen[event.id] += 1

    return app


@pytest.mark.redis
async def test_concurrent_publishes_share_round_trips(redis_server: RedisServer) -> None:
    """200 concurrent publishes cost far fewer round trips than publishes, counted by the server."""
    redis_server.command("FLUSHALL")
    async with run_apps(broker=redis_server.url) as env:  # a plain publisher: no fetch loop runs scripts
        before = socket_reads(redis_server.url)
        await asyncio.gather(*(env.publish("batch.published", {"n": n}) for n in range(CALLERS)))
        round_trips = socket_reads(redis_server.url) - before
    assert 1 <= round_trips <= CALLERS // 10
    assert int(redis_server.command("XLEN", "choreo:batch.published")) == CALLERS


async def test_each_concurrent_publish_is_delivered_once(broker_url: str) -> None:
    """Every one of 200 concurrent publishes arrives once, under the id its caller got back."""
    seen: Counter[str] = Counter()
    async with run_apps(recording_app(seen), broker=broker_url) as env:
        events = await asyncio.gather(*(env.publish("batch.published", {"n": n}) for n in range(CALLERS)))
        await env.settle(timeout=20)
    assert seen == Counter(event.id for event in events)
    assert len(seen) == CALLERS


async def test_an_invalid_event_fails_only_its_caller(broker_url: str) -> None:
    """Data that is not JSON fails its own publish with DecodeError; the neighbours' events go out."""
    seen: Counter[str] = Counter()
    async with run_apps(recording_app(seen), broker=broker_url) as env:
        data: list[dict[str, Any]] = [{"n": n} for n in range(CALLERS)]
        data[CALLERS // 2] = {"n": {1, 2}}  # a set is not JSON
        outcomes = await asyncio.gather(
            *(env.publish("batch.published", each) for each in data), return_exceptions=True
        )
        await env.settle(timeout=20)
    failed = [n for n, outcome in enumerate(outcomes) if isinstance(outcome, BaseException)]
    assert failed == [CALLERS // 2]
    assert isinstance(outcomes[CALLERS // 2], DecodeError)
    assert seen == Counter(outcome.id for outcome in outcomes if isinstance(outcome, Event))


async def test_a_saga_start_that_loses_its_compare_and_set_is_refused_alone(broker_url: str) -> None:
    """Concurrent commits with state writes (saga starts) each get their own status: one
    CONFLICT publishes nothing and leaves its neighbours OK and published."""
    seen: Counter[str] = Counter()
    async with run_apps(recording_app(seen), broker=broker_url) as env:
        runtime = env.runtime
        events = [Event("batch.published", {"n": n}) for n in range(50)]
        # Key 7 expects a version it does not have: only that start conflicts.
        writes = [StateWrite(f"start:{n}", b"record", 3 if n == 7 else 0) for n in range(50)]
        statuses = await asyncio.gather(
            *(runtime.commit([(event, None)], state=[write]) for event, write in zip(events, writes, strict=True))
        )
        await env.settle(timeout=20)
        stored = await runtime.broker.list_state("start:")
    assert [n for n, status in enumerate(statuses) if status is not CommitStatus.OK] == [7]
    assert statuses[7] is CommitStatus.CONFLICT
    assert set(stored) == {f"start:{n}" for n in range(50) if n != 7}
    assert seen == Counter(event.id for n, event in enumerate(events) if n != 7)


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_a_broker_outage_fails_every_caller_and_publishes_nothing(
    kind: str, start_redis: Callable[..., RedisServer]
) -> None:
    """With the broker gone, each of 200 concurrent publishes fails with BrokerUnavailable,
    and once it is back none of them is found half-published."""
    server = start_redis(appendonly=True) if kind == "redis" else None
    broker = brokers.from_url(server.url if server is not None else "memory://")
    async with run_apps(broker=broker) as env:
        await env.publish("batch.before", {})
        if server is not None:
            server.kill()
        else:
            await broker.close()
        outcomes = await asyncio.gather(
            *(env.publish("batch.published", {"n": n}) for n in range(CALLERS)), return_exceptions=True
        )
    assert all(isinstance(outcome, BrokerUnavailable) for outcome in outcomes), outcomes[:3]
    if server is not None:
        server.start()
    await broker.connect()
    try:
        assert [entry.topic for entry in await broker.history()] == ["batch.before"]
    finally:
        await broker.close()


async def test_cancelling_a_waiting_publisher_loses_and_duplicates_nothing(broker_url: str) -> None:
    """A caller cancelled while its publish waits for the next round trip does not take its
    neighbours' events with it, nor make any of them arrive twice."""
    seen: Counter[str] = Counter()
    async with run_apps(recording_app(seen), broker=broker_url) as env:
        events = [Event("batch.published", {"n": n}) for n in range(CALLERS)]
        tasks = [asyncio.create_task(env.runtime.commit([(event, None)])) for event in events]
        await asyncio.sleep(0)  # every caller has queued its commit; the first round trip is not back
        cancelled = tasks[CALLERS // 2]
        cancelled.cancel()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        await env.settle(timeout=20)
    # On memory a commit never waits, so it may have finished before the cancel came.
    assert isinstance(outcomes[CALLERS // 2], asyncio.CancelledError) or outcomes[CALLERS // 2] is CommitStatus.OK
    assert all(status is CommitStatus.OK for n, status in enumerate(outcomes) if n != CALLERS // 2)
    others = Counter(event.id for n, event in enumerate(events) if n != CALLERS // 2)
    assert seen - Counter({events[CALLERS // 2].id: 1}) == others
    assert seen[events[CALLERS // 2].id] <= 1
