"""Saga state in PostgreSQL: records in tables, transitions with their commands
in one transaction (outbox), replies handled once (inbox), on every broker."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from choreo import App, SagaCoordinator, SagaState, SagaStep
from choreo.errors import DecodeError
from choreo.postgres import PostgresStateStore
from choreo.saga.definition import SagaNotFound
from choreo.saga.query import Cursor
from choreo.testing import run_apps
from tests.redis_server import RedisServer
from tests.test_saga_brokers import build
from tests.worker_process import choreo


async def test_saga_completes_and_another_compensates_with_postgres_state(broker_url: str, database_url: str) -> None:
    """The design's `state_store=PostgresStateStore(url)`: sagas run and their records live in PostgreSQL."""
    ledger: dict[str, int] = {}
    coordinator, apps = build(ledger, state_store=PostgresStateStore(database_url))
    async with run_apps(*apps, broker=broker_url) as env:
        ok = await coordinator.start_saga("order_processing", {"total": 10}, saga_id="ok", timeout=20)
        bad = await coordinator.start_saga("order_processing", {"total": 1000}, saga_id="bad", timeout=20)
        await env.settle(timeout=10)
        assert env.dead_letters() == []
        assert await env.broker.list_state("") == {}  # nothing in the broker's state
    assert ok.state is SagaState.COMPLETED and bad.state is SagaState.COMPENSATED
    assert set(ledger.values()) == {1}
    async with PostgresStateStore(database_url) as store:
        stored = await store.get_record("bad")
        assert stored is not None and stored.state is SagaState.COMPENSATED
        assert await store.count_records() == {SagaState.COMPLETED: 1, SagaState.COMPENSATED: 1}


@pytest.mark.parametrize("state", ["broker", "postgres"])
async def test_saga_events_are_held_to_the_runtimes_size_limit(
    broker_url: str, state: str, request: pytest.FixtureRequest
) -> None:
    """A saga whose first command is over the runtime's max_size is refused at its start with DecodeError,
    with PostgreSQL state as with broker state (not at the default 1 MiB), and nothing is stored."""
    store = PostgresStateStore(request.getfixturevalue("database_url")) if state == "postgres" else None
    coordinator, apps = build({}, state_store=store)
    async with run_apps(*apps, broker=broker_url, max_size=4096) as env:
        with pytest.raises(DecodeError):
            await coordinator.start_saga("order_processing", {"total": 10, "note": "x" * 8000}, saga_id="big")
        with pytest.raises(SagaNotFound):
            await coordinator.get_saga_state("big")
        small = await coordinator.start_saga("order_processing", {"total": 10}, saga_id="small", timeout=20)
        assert small.state is SagaState.COMPLETED
        await env.settle(timeout=10)


def growing_saga(state_store: PostgresStateStore | None) -> tuple[SagaCoordinator, App]:
    """Two steps whose results (3 kB each) fit in their replies, but not together in the third step's command."""
    app = App("grow_service")
    coordinator = SagaCoordinator(app, state_store=state_store)
    coordinator.define_saga("growing", [
        SagaStep(name, "grow_service", name, None, timeout=1.0, retry_count=0, compensatable=False)
        for name in ("first", "second", "third")
    ])

    @app.action("first")
    async def first(data: dict[str, Any]) -> dict[str, Any]:
        return {"a": "x" * 3000} if data.get("grow") else {}

    @app.action("second")
    async def second(data: dict[str, Any]) -> dict[str, Any]:
        return {"b": "y" * 3000} if data.get("grow") else {}

    @app.action("third")
    async def third() -> None:
        pass

    return coordinator, app


@pytest.mark.parametrize("state", ["broker", "postgres"])
async def test_an_oversized_command_of_a_transition_is_dead_lettered_at_once(
    broker_url: str, state: str, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> None:
    """A reply whose transition emits a command over max_size is dead-lettered on its first attempt with a
    reason naming the size and the limit, never retried, with PostgreSQL state as with broker state; the
    worker goes on and another saga completes."""
    store = PostgresStateStore(request.getfixturevalue("database_url")) if state == "postgres" else None
    coordinator, app = growing_saga(store)
    async with run_apps(app, broker=broker_url, max_size=4096) as env:
        big = await coordinator.start_saga("growing", {"grow": True}, saga_id="big", wait=False)
        await env.settle(timeout=20)
        small = await coordinator.start_saga("growing", {}, saga_id="small", timeout=20)
        await env.settle(timeout=20)
        (dead,) = env.dead_letters()
        big = await coordinator.get_saga_state("big")
    assert small.state is SagaState.COMPLETED
    assert (dead.topic, dead.group, dead.attempts) == ("saga.reply.growing", "grow_service.saga_growing_reply", 1)
    assert dead.event is not None and dead.event.attempt == 1 and dead.event.data["step"] == "second"
    assert re.search(r"is \d+ bytes, over the 4096-byte limit", dead.reason), dead.reason
    assert "cannot be encoded" in dead.reason, dead.reason
    assert [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()] == []
    # The reply never moved the saga on, so its step timed out, as a lost reply's does.
    assert big.state is SagaState.COMPENSATED, big


async def test_cli_lists_and_shows_sagas_kept_in_postgres(database_url: str, redis_server: RedisServer) -> None:
    """choreo saga list|status --database read PostgreSQL (also from CHOREO_DATABASE_URL)."""
    redis_server.command("FLUSHALL")
    coordinator, apps = build({}, state_store=PostgresStateStore(database_url))
    async with run_apps(*apps, broker=redis_server.url) as env:
        await coordinator.start_saga("order_processing", {"total": 10}, saga_id="cli-ok", timeout=20)
        await coordinator.start_saga("order_processing", {"total": 1000}, saga_id="cli-bad", timeout=20)
        await env.settle(timeout=10)
    listed = choreo("saga", "list", "--database", database_url, "--json")
    assert listed.returncode == 0, listed.stderr
    assert [json.loads(line)["saga_id"] for line in listed.stdout.splitlines()] == ["cli-ok", "cli-bad"]
    failed = choreo("saga", "list", "--state", "compensated", env={"CHOREO_DATABASE_URL": database_url})
    assert "cli-bad" in failed.stdout and "cli-ok" not in failed.stdout
    shown = choreo("saga", "status", "cli-bad", "--database", database_url)
    assert shown.returncode == 0 and "state:  compensated" in shown.stdout
    missing = choreo("saga", "status", "nope", "--database", database_url)
    assert missing.returncode == 1 and "no saga 'nope'" in missing.stderr


async def test_listing_by_state_and_name_uses_an_index(database_url: str) -> None:
    """With many sagas, the page queries by state, by name and unfiltered are index scans, never a sequential scan."""
    async with PostgresStateStore(database_url) as store:
        async with store.database.connection() as conn:
            await conn.execute(
                "INSERT INTO choreo_sagas SELECT 's-' || i, 'n' || (i % 20),"
                " (ARRAY['running','completed','failed'])[1 + i % 3], 1, 's-' || i, i, i, NULL, NULL, '{}'::jsonb, 1"
                " FROM generate_series(1, 20000) AS i"
            )
            await conn.execute("ANALYZE choreo_sagas")
        for state, name in ((SagaState.FAILED, None), (None, "n3"), (SagaState.RUNNING, "n3"), (None, None)):
            plan = await store.explain(state=state, name=name)
            assert "Index" in plan and "Seq Scan" not in plan, plan


async def test_pages_run_newest_first_from_a_cursor(database_url: str) -> None:
    """page_records pages newest first and continues after a Cursor; count_records counts per state."""
    coordinator, apps = build({}, state_store=PostgresStateStore(database_url))
    async with run_apps(*apps, broker="memory://") as env:
        for i in range(5):
            await coordinator.start_saga("order_processing", {"total": 10 if i % 2 else 1000}, saga_id=f"p-{i}")
        await env.settle(timeout=10)
    async with PostgresStateStore(database_url) as store:
        first = await store.page_records(limit=2)
        rest = await store.page_records(after=Cursor.after(first[-1]), limit=10)
        assert [r.saga_id for r in first + rest] == [f"p-{i}" for i in reversed(range(5))]
        compensated = await store.page_records(state=SagaState.COMPENSATED, name="order_processing")
        assert [r.saga_id for r in compensated] == ["p-4", "p-2", "p-0"]
        assert await store.count_records(name="order_processing") == {
            SagaState.COMPLETED: 2, SagaState.COMPENSATED: 3}
        assert await store.count_records(name="other") == {}


async def test_replayed_replies_change_nothing(broker_url: str, database_url: str) -> None:
    """Every reply of a finished saga published again: the records stay as they were."""
    coordinator, apps = build({}, state_store=PostgresStateStore(database_url))
    async with run_apps(*apps, broker=broker_url) as env:
        await coordinator.start_saga("order_processing", {"total": 10}, saga_id="twice", timeout=20)
        await env.settle(timeout=10)
        before = await coordinator.get_saga_state("twice")
        for reply in env.published("saga.reply.order_processing"):
            await env.publish(reply.type, reply.data, saga_id=reply.saga_id)
        await env.settle(timeout=10)
        assert await coordinator.get_saga_state("twice") == before
        assert env.dead_letters() == []
