"""Saga state in PostgreSQL: records in tables, transitions with their commands
in one transaction (outbox), replies handled once (inbox), on every broker."""

from __future__ import annotations

from choreo import SagaState
from choreo.postgres import PostgresStateStore
from choreo.testing import run_apps
from tests.test_saga_brokers import build


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
