"""Saga versions: side by side, in-flight sagas on their own version, a missing version left alone, the deploy gate."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from typer.testing import CliRunner

import brokers
from choreo import App, SagaCoordinator, SagaState, SagaStep
from choreo.cli import app as cli
from choreo.metrics import Metrics
from choreo.postgres import PostgresStateStore
from choreo.saga.record import SagaRecord
from choreo.testing import run_apps
from tests.redis_server import RedisServer

POLICY: dict[str, Any] = {"timeout": 5.0, "retry_count": 1, "retry_delay": 2.0}
V1 = [
    SagaStep("reserve", "stock", "reserve", "release", **POLICY),
    SagaStep("charge", "payments", "charge", "refund", **POLICY),
]
V2 = [
    SagaStep("charge", "payments", "charge", "refund", **POLICY),
    SagaStep("reserve", "stock", "reserve", "release", **POLICY),
]


def participants(calls: list[str], fail_first_charge: bool) -> list[App]:
    stock, payments = App("stock"), App("payments")

    @stock.action("reserve")
    async def reserve(saga_id: str) -> None:
        calls.append(f"reserve {saga_id}")

    @payments.action("charge")
    async def charge(saga_id: str) -> None:
        calls.append(f"charge {saga_id}")
        if fail_first_charge and calls.count(f"charge {saga_id}") == 1:
            raise ConnectionError("issuer busy")

    return [stock, payments]


def shop(*versions: int, state_store: Any = None) -> tuple[App, SagaCoordinator]:
    app = App("shop")
    coordinator = SagaCoordinator(app, sweep_interval=None, state_store=state_store)
    for version in versions:
        coordinator.define_saga("order", V1 if version == 1 else V2, version=version)
    return app, coordinator


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def park_a_version_1_saga(broker: brokers.Broker, calls: list[str]) -> None:
    """Version 1 runs until its charge failed once: the retry waits, delayed, in the broker."""
    app, coordinator = shop(1)
    async with run_apps(app, *participants(calls, fail_first_charge=True), broker=broker):
        await coordinator.start_saga("order", {}, saga_id="S-old", wait=False)

        async def charged_once() -> bool:
            return (await coordinator.get_saga_state("S-old")).step("charge").error is not None

        await until(charged_once)


async def test_two_versions_run_side_by_side_and_each_saga_finishes_on_its_own(broker_url: str) -> None:
    """A saga started on version 1 finishes on version 1 after version 2 is deployed; new sagas start on 2."""
    broker = brokers.from_url(broker_url)
    calls: list[str] = []
    try:
        await park_a_version_1_saga(broker, calls)
        app, coordinator = shop(1, 2)
        async with run_apps(app, *participants(calls, fail_first_charge=False), broker=broker):
            new = await coordinator.start_saga("order", {}, saga_id="S-new", timeout=20)

            async def old_done() -> bool:
                return (await coordinator.get_saga_state("S-old")).state.terminal

            await until(old_done)
            old = await coordinator.get_saga_state("S-old")
    finally:
        await broker.close()
    assert (old.state, old.version, [s.name for s in old.steps]) == (SagaState.COMPLETED, 1, ["reserve", "charge"])
    assert (new.state, new.version, [s.name for s in new.steps]) == (SagaState.COMPLETED, 2, ["charge", "reserve"])
    assert calls.index("charge S-new") < calls.index("reserve S-new")
    assert old.step("charge").attempts == 2


async def test_a_reply_for_a_version_no_longer_defined_leaves_the_saga_as_it_is(broker_url: str) -> None:
    """With version 1 dropped, its saga's reply changes nothing: logged, counted, the record untouched."""
    broker = brokers.from_url(broker_url)
    calls: list[str] = []
    metrics = Metrics()
    try:
        await park_a_version_1_saga(broker, calls)
        before = await broker.get_state("saga:S-old")
        assert before is not None
        app, coordinator = shop(2)
        async with run_apps(app, *participants(calls, fail_first_charge=False), broker=broker, middleware=[metrics]):

            async def counted() -> bool:
                value = metrics.registry.get_sample_value(
                    "choreo_saga_version_missing_total", {"saga": "order", "version": "1"}
                )
                return value is not None and value >= 1

            await until(counted)
            after = await broker.get_state("saga:S-old")
            resumed = await coordinator.resume_saga("S-old", wait=False)
    finally:
        await broker.close()
    assert after is not None and after.version == before.version and after.value == before.value
    record = SagaRecord.from_json(after.value)
    assert (record.state, record.version, resumed.state) == (SagaState.RUNNING, 1, SagaState.RUNNING)
    assert calls.count("charge S-old") == 2  # the retry ran; its reply waits for a coordinator of version 1


def test_versions_are_validated_and_the_highest_is_the_definition() -> None:
    """A version is an integer >= 1, defined once; the coordinator's definition of a name is its highest version."""
    from choreo.errors import ConfigurationError

    app, coordinator = shop(2, 1)
    assert coordinator.definition("order").version == 2
    assert [d.version for d in coordinator.versions.of("order")] == [1, 2]
    with pytest.raises(ConfigurationError, match="version 1 is already defined"):
        coordinator.define_saga("order", V1, version=1)
    with pytest.raises(ConfigurationError, match="version must be an integer >= 1"):
        coordinator.define_saga("order", V1, version=0)
    routes = {route.event: route for route in app.routes}
    assert set(routes["saga.reply.order"].emits) >= {"saga.cmd.stock.reserve", "saga.cmd.payments.refund"}


@pytest.mark.redis
def test_deploy_gate_lists_sagas_in_flight_on_versions_no_target_defines(redis_url: str) -> None:
    """choreo check TARGET --broker URL exits 1 naming a version 1 saga in flight when the targets define only
    version 2, and passes when a target keeps version 1."""

    async def start_a_version_1_saga() -> None:
        app, coordinator = shop(1)
        async with run_apps(app, broker=redis_url):
            await coordinator.start_saga("order", {}, saga_id="S-v1", wait=False)

    asyncio.run(start_a_version_1_saga())
    runner = CliRunner()
    participants = ["tests.apps.versioned:stock", "tests.apps.versioned:payments"]
    clean = runner.invoke(cli, ["check", "tests.apps.versioned:app", *participants])
    assert clean.exit_code == 0, clean.output  # without --broker, no state is read
    failed = runner.invoke(cli, ["check", "tests.apps.versioned:app", *participants, "--broker", redis_url])
    assert failed.exit_code == 1, failed.output
    assert "stranded-saga: saga S-v1 (order version 1, running)" in failed.stdout
    kept = runner.invoke(cli, ["check", "tests.apps.versioned:app_both", *participants, "--broker", redis_url])
    assert kept.exit_code == 0, kept.output
    assert "stranded" not in kept.output


def test_deploy_gate_reads_sagas_kept_in_postgres(database_url: str, redis_url: str) -> None:
    """choreo check TARGET --database URL (or CHOREO_DATABASE_URL) exits 1 naming a version 1 saga kept in
    PostgreSQL when the targets define only version 2, and passes when a target keeps version 1; finished
    sagas on a dropped version do not count."""

    async def start_version_1_sagas() -> None:
        app, coordinator = shop(1, state_store=PostgresStateStore(database_url))
        async with run_apps(app, broker=redis_url):
            await coordinator.start_saga("order", {}, saga_id="S-v1", wait=False)
        async with PostgresStateStore(database_url) as store, store.database.connection() as conn:
            await conn.execute(
                "INSERT INTO choreo_sagas (saga_id, name, created_at, row_version, state, definition_version,"
                " correlation_id, updated_at, record) SELECT 'S-done', name, created_at, 1, 'completed',"
                " definition_version, correlation_id, updated_at,"
                " jsonb_set(jsonb_set(record, '{saga_id}', '\"S-done\"'), '{state}', '\"completed\"')"
                " FROM choreo_sagas WHERE saga_id = 'S-v1'"
            )

    asyncio.run(start_version_1_sagas())
    runner = CliRunner()
    participants = ["tests.apps.versioned:stock", "tests.apps.versioned:payments"]
    on_broker = runner.invoke(cli, ["check", "tests.apps.versioned:app", *participants, "--broker", redis_url])
    assert on_broker.exit_code == 0, on_broker.output  # the broker's state holds none of them
    failed = runner.invoke(cli, ["check", "tests.apps.versioned:app", *participants, "--database", database_url])
    assert failed.exit_code == 1, failed.output
    assert failed.stdout.count("stranded-saga") == 1
    assert "stranded-saga: saga S-v1 (order version 1, running)" in failed.stdout
    from_env = runner.invoke(cli, ["check", "tests.apps.versioned:app", *participants, "--broker", redis_url],
                             env={"CHOREO_DATABASE_URL": database_url})
    assert from_env.exit_code == 1 and "S-v1" in from_env.stdout, from_env.output
    kept = runner.invoke(cli, ["check", "tests.apps.versioned:app_both", *participants, "--database", database_url])
    assert kept.exit_code == 0, kept.output
    assert "stranded" not in kept.output


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The deploy gate reads a broker that another process (the CLI) can reach."""
    redis_server.command("FLUSHALL")
    return redis_server.url
