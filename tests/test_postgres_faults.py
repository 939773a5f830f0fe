"""Transactional handlers and PostgreSQL saga state under faults: kill -9 of a
worker between the PostgreSQL commit and the broker ack, the relay killed
between its publish and its delete, PostgreSQL restarted mid-run."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from choreo import App, Event, SagaState
from choreo.postgres import PostgresStateStore
from choreo.testing import run_apps
from tests.apps import pg_orders
from tests.ledger import keep_effects
from tests.postgres_server import PostgresServer
from tests.redis_server import RedisServer
from tests.test_saga_brokers import build
from tests.worker_process import WorkerProcess

JOBS = 10


def recorded_ids(url: str) -> dict[str, set[str]]:
    """The event ids of ``pg.recorded`` on the broker, per order."""
    client = redis.Redis.from_url(url.split("?")[0])
    try:
        ids: dict[str, set[str]] = {}
        for _, fields in client.xrange("choreo:pg.recorded"):
            body = json.loads(fields[b"body"])
            ids.setdefault(body["data"]["order"], set()).add(body["id"])
        return ids
    finally:
        client.close()


def table_rows(url: str) -> Counter[str]:
    with psycopg.connect(url) as conn:
        return Counter(order for (order,) in conn.execute("SELECT order_id FROM pg_orders").fetchall())


async def wait_until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("crash_at", ["dispatcher.before_commit:pgshop.record", "relay.after_publish"])
async def test_worker_killed_after_the_database_commit_leaves_writes_and_events_once(
    redis_server: RedisServer, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash_at: str
) -> None:
    """kill -9 after the PostgreSQL commit and before the ack (or after the relay published and before it
    deleted the rows): the survivor finds the inbox row and acks, rows 1 each, one event id each, and a
    downstream consumer handles each event once."""
    redis_server.command("FLUSHALL")
    url = redis_server.url + "?visibility_timeout=1"
    keep_effects(url, "pg.recorded")
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(pg_orders.TABLE)
    ledger = tmp_path / "ledger"
    audit = App("audit")
    seen: Counter[str] = Counter()

    @audit.on_event("pg.recorded")
    async def count(event: Event) -> None:
        seen[event.data["order"]] += 1

    first = survivor = None
    try:
        async with run_apps(audit, broker=url) as env:
            for i in range(JOBS):
                await env.publish("pg.order", {"order": f"o-{i}", "ledger": str(ledger)})
            monkeypatch.setenv("CHOREO_FAILPOINTS", f"{crash_at}=kill")
            first = WorkerProcess("tests.apps.pg_orders:app", "--broker", url, "--database", database_url)
            first.start()
            assert first.process is not None
            await asyncio.to_thread(first.process.wait, 30)
            assert first.process.returncode == -signal.SIGKILL
            monkeypatch.delenv("CHOREO_FAILPOINTS")
            survivor = WorkerProcess("tests.apps.pg_orders:app", "--broker", url, "--database", database_url).start()
            await wait_until(lambda: sum(seen.values()) >= JOBS, 60, "every order audited")
            await env.settle(timeout=30)
    finally:
        for worker in (first, survivor):
            if worker is not None:
                worker.kill()
    orders = [f"o-{i}" for i in range(JOBS)]
    assert table_rows(database_url) == Counter({o: 1 for o in orders})
    assert {o: len(ids) for o, ids in recorded_ids(url).items()} == {o: 1 for o in orders}
    assert seen == Counter({o: 1 for o in orders})
    runs = Counter(line.split()[1] for line in ledger.read_text().splitlines())
    if crash_at.startswith("dispatcher"):
        assert max(runs.values()) == 2  # the killed delivery ran again, and the inbox made it a no-op


async def test_postgres_restart_mid_run_loses_nothing(
    start_postgres: Any, redis_server: RedisServer
) -> None:
    """PostgreSQL stopped and started while sagas and transactional handlers run: handlers pause and run
    again, every saga ends (completed, or compensated where a 1 s step timed out during the outage), every
    order has one row and one event."""
    redis_server.command("FLUSHALL")
    server: PostgresServer = start_postgres()
    database_url = server.create_database()
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(pg_orders.TABLE)
    coordinator, apps = build({}, state_store=PostgresStateStore(database_url))
    async with run_apps(*apps, pg_orders.app, broker=redis_server.url, database=database_url) as env:
        for i in range(JOBS):
            await env.publish("pg.order", {"order": f"o-{i}"})
            await coordinator.start_saga("order_processing", {"total": 10}, saga_id=f"s-{i}", wait=False)
        await asyncio.to_thread(server.restart)
        for i in range(JOBS, 2 * JOBS):
            await env.publish("pg.order", {"order": f"o-{i}"})
        await asyncio.to_thread(server.kill)
        await asyncio.sleep(1.0)
        await asyncio.to_thread(server.start)
        for i in range(JOBS):
            result = await coordinator.start_saga("order_processing", saga_id=f"s-{i}", timeout=60)
            assert result.state in (SagaState.COMPLETED, SagaState.COMPENSATED)
        await env.settle(timeout=60)
        recorded = Counter(e.data["order"] for e in env.published("pg.recorded"))
        assert env.dead_letters() == []
    orders = [f"o-{i}" for i in range(2 * JOBS)]
    assert table_rows(database_url) == Counter({o: 1 for o in orders})
    assert set(recorded) == set(orders)


async def test_handlers_waiting_out_a_database_outage_keep_their_leases(
    start_postgres: Any, broker_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """100 transactional handlers hold their deliveries through a PostgreSQL outage three times their
    lease (each pauses and runs again, renewed all together meanwhile): none is reclaimed, every order
    has one row and one event, nothing is dead-lettered."""
    server: PostgresServer = start_postgres()
    database_url = server.create_database()
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(pg_orders.TABLE)
    lease = 0.6
    url = broker_url + ("&" if "?" in broker_url else "?") + f"visibility_timeout={lease}&claim_interval=0.1"
    orders = [f"o-{i}" for i in range(100)]
    async with run_apps(pg_orders.app, broker=url, database=database_url) as env:
        await asyncio.to_thread(server.stop)
        for order in orders:
            await env.publish("pg.order", {"order": order})
        await wait_until(lambda: env.runtime.in_flight == len(orders), 10, "every order in flight")
        await asyncio.sleep(3 * lease)
        await asyncio.to_thread(server.start)
        await env.settle(timeout=60)
        recorded = Counter(e.data["order"] for e in env.published("pg.recorded"))
        assert env.dead_letters() == []
    assert [r.getMessage() for r in caplog.records if "was lost" in r.getMessage()] == []
    assert table_rows(database_url) == Counter(dict.fromkeys(orders, 1))
    assert recorded == Counter(dict.fromkeys(orders, 1))
