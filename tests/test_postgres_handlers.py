"""Transactional handlers: a handler's writes, its emitted events and its inbox
row commit together in PostgreSQL, and the ack follows, on every broker."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import psycopg
import pytest

from choreo import App, Context
from choreo.errors import ConfigurationError
from choreo.testing import run_apps
from tests.apps import pg_orders


def rows(url: str) -> Counter[str]:
    with psycopg.connect(url) as conn:
        return Counter(order for (order,) in conn.execute("SELECT order_id FROM pg_orders").fetchall())


def prepare(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(pg_orders.TABLE)


async def test_writes_and_events_commit_together_once(broker_url: str, database_url: str) -> None:
    """Each order gets one row and one pg.recorded; a failed attempt's write is rolled back."""
    prepare(database_url)
    async with run_apps(pg_orders.app, broker=broker_url, database=database_url) as env:
        for i in range(20):
            await env.publish("pg.order", {"order": f"o-{i}", "fail_once": i % 5 == 0})
        await env.settle(timeout=20)
        recorded = Counter(e.data["order"] for e in env.published("pg.recorded"))
        assert env.dead_letters() == []
    assert rows(database_url) == Counter({f"o-{i}": 1 for i in range(20)})
    assert recorded == Counter({f"o-{i}": 1 for i in range(20)})
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM choreo_outbox").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM choreo_inbox").fetchone() == (20,)


async def test_handlers_without_a_transaction_work_as_before(broker_url: str, database_url: str) -> None:
    """A runtime with a database still runs plain handlers, emitting through the broker."""
    app = App("plain")

    @app.on_event("plain.ping")
    @app.emits("plain.pong")
    async def ping(data: dict[str, Any]) -> dict[str, Any]:
        return {"pong": True}

    async with run_apps(app, broker=broker_url, database=database_url) as env:
        await env.publish("plain.ping", {})
        await env.settle(timeout=10)
        assert [e.data for e in env.published("plain.pong")] == [{"pong": True}]


async def test_transaction_without_a_database_is_a_clear_error(broker_url: str) -> None:
    """ctx.transaction() in a runtime without a database fails naming the options that attach one."""
    app = App("nodb")
    seen: list[BaseException] = []

    @app.on_event("nodb.job", retries=0)
    async def job(ctx: Context) -> None:
        try:
            async with ctx.transaction():
                pass
        except ConfigurationError as exc:
            seen.append(exc)
            raise

    async with run_apps(app, broker=broker_url) as env:
        await env.publish("nodb.job", {})
        await env.settle(timeout=10)
        assert len(env.dead_letters()) == 1
    assert "database=url" in str(seen[0]) and "--database" in str(seen[0])


def test_database_url_must_be_postgresql() -> None:
    from choreo.postgres import PostgresStateStore

    with pytest.raises(ConfigurationError, match="postgresql://"):
        PostgresStateStore("mysql://x/y").database.url  # noqa: B018


async def test_a_deadlock_runs_the_losing_handler_again(broker_url: str, database_url: str) -> None:
    """Two handlers lock two rows in opposite orders: PostgreSQL aborts one (deadlock), which runs again
    at once; both commit once, and nothing is dead-lettered."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE counters (name text PRIMARY KEY, n int NOT NULL)")
        conn.execute("INSERT INTO counters VALUES ('a', 0), ('b', 0)")
        conn.execute("ALTER DATABASE " + database_url.rsplit("/", 1)[1] + " SET deadlock_timeout = '100ms'")
    app = App("locks")
    runs: Counter[str] = Counter()
    both = asyncio.Barrier(2)

    @app.on_event("locks.job", retries=0)
    async def job(data: dict[str, Any], ctx: Context) -> None:
        runs[data["first"]] += 1
        async with ctx.transaction() as conn:
            await conn.execute("UPDATE counters SET n = n + 1 WHERE name = %s", (data["first"],))
            if runs[data["first"]] == 1:
                await both.wait()  # each holds its first row before asking for the other's
            await conn.execute("UPDATE counters SET n = n + 1 WHERE name = %s", (data["second"],))

    async with run_apps(app, broker=broker_url, database=database_url) as env:
        await env.publish("locks.job", {"first": "a", "second": "b"})
        await env.publish("locks.job", {"first": "b", "second": "a"})
        await env.settle(timeout=20)
        assert env.dead_letters() == []
    with psycopg.connect(database_url) as conn:
        assert dict(conn.execute("SELECT name, n FROM counters").fetchall()) == {"a": 2, "b": 2}
    # The deadlock's loser ran again. Its rerun starts at once and can take
    # its first row before the winner does, so a second deadlock (and a
    # third run) is possible; what counts is the rows: each committed once.
    assert sum(runs.values()) >= 3 and min(runs.values()) >= 1
