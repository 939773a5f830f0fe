"""Sagas on real brokers (memory and Redis): state, lifecycle events, races and bad replies."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest

from brokers import Message, StateWrite
from choreo import App, Context, SagaCoordinator, SagaState, SagaStep
from choreo.events import Event
from choreo.metrics import Metrics
from choreo.saga import SagaNotFound, StepStatus
from choreo.testing import run_apps


def build(
    ledger: dict[str, int], *, decline_over: float = 100.0, step_timeout: float = 1.0, **options: Any
) -> tuple[SagaCoordinator, list[App]]:
    orders = App("order_service")
    payments = App("payment_service")
    coordinator = SagaCoordinator(orders, **options)
    coordinator.define_saga(
        "order_processing",
        [
            # Small step timeouts: ``settle`` waits for every step's timer to fire.
            SagaStep("create_order", "order_service", "create_order", "cancel_order", timeout=step_timeout,
                     retry_count=0),
            SagaStep(
                "process_payment",
                "payment_service",
                "charge_card",
                "refund_card",
                timeout=step_timeout,
                retry_count=1,
                retry_delay=0.0,
            ),
            SagaStep("ship", "order_service", "ship", None, timeout=step_timeout, retry_count=0),
        ],
    )

    def effect(ctx: Context) -> None:
        ledger[ctx.idempotency_key] = ledger.get(ctx.idempotency_key, 0) + 1

    @orders.action("create_order")
    async def create_order(ctx: Context) -> dict[str, Any]:
        effect(ctx)
        return {"order": "created"}

    @orders.action("cancel_order")
    async def cancel_order(ctx: Context) -> None:
        effect(ctx)

    @orders.action("ship")
    def ship(ctx: Context) -> dict[str, Any]:  # sync actions run in a thread
        effect(ctx)
        return {"tracking": "T-1"}

    @payments.action("charge_card")
    async def charge_card(data: dict[str, Any], ctx: Context) -> dict[str, Any]:
        if data["total"] > decline_over:
            raise ValueError("card declined")
        effect(ctx)
        return {"payment_id": "PAY-1"}

    @payments.action("refund_card")
    async def refund_card(ctx: Context) -> None:
        effect(ctx)

    return coordinator, [orders, payments]


async def test_saga_completes_and_another_compensates(broker_url: str) -> None:
    """On each broker one saga completes and a declined one compensates, each effect applied once."""
    ledger: dict[str, int] = {}
    coordinator, apps = build(ledger)
    async with run_apps(*apps, broker=broker_url) as env:
        ok = await coordinator.start_saga("order_processing", {"total": 10}, saga_id="ok", timeout=20)
        bad = await coordinator.start_saga("order_processing", {"total": 1000}, saga_id="bad", timeout=20)
        await env.settle(timeout=10)
        stored = await coordinator.get_saga_state("bad")
        lifecycle = [(e.type, e.data["saga"], e.saga_id) for e in env.published() if e.type.startswith("saga.order")]
        assert env.dead_letters() == []
    assert ok.state is SagaState.COMPLETED and ok.data == {
        "total": 10,
        "order": "created",
        "payment_id": "PAY-1",
        "tracking": "T-1",
    }
    assert bad.state is SagaState.COMPENSATED and stored == bad
    assert [s.status for s in bad.steps] == ["compensated", "failed", "pending"]
    assert bad.step("process_payment").attempts == 2
    assert set(ledger.values()) == {1}
    assert "bad:create_order:cancel_order" in ledger and "bad:process_payment:refund_card" not in ledger
    assert lifecycle == [
        ("saga.order_processing.started", "order_processing", "ok"),
        ("saga.order_processing.completed", "order_processing", "ok"),
        ("saga.order_processing.started", "order_processing", "bad"),
        ("saga.order_processing.compensating", "order_processing", "bad"),
        ("saga.order_processing.compensated", "order_processing", "bad"),
    ]


async def test_existing_saga_id_is_not_started_twice(broker_url: str) -> None:
    """start_saga with a saga_id that exists returns that saga instead of starting another."""
    ledger: dict[str, int] = {}
    coordinator, apps = build(ledger)
    async with run_apps(*apps, broker=broker_url) as env:
        first = await coordinator.start_saga("order_processing", {"total": 1}, saga_id="dup", timeout=20)
        again = await coordinator.start_saga("order_processing", {"total": 999}, saga_id="dup", timeout=20)
        await env.settle(timeout=10)
        assert len(env.published("saga.order_processing.started")) == 1
    assert again == first and again.data["total"] == 1
    assert ledger["dup:create_order:create_order"] == 1


async def test_unknown_saga_is_reported(broker_url: str) -> None:
    """get_saga_state of an unknown id raises SagaNotFound."""
    coordinator, apps = build({})
    async with run_apps(*apps, broker=broker_url):
        with pytest.raises(SagaNotFound):
            await coordinator.get_saga_state("nope")


async def test_duplicate_and_unknown_replies_are_ignored(broker_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """Replaying every reply of a finished saga and replying for an unknown saga change nothing."""
    caplog.set_level(logging.INFO, logger="choreo.saga")
    ledger: dict[str, int] = {}
    coordinator, apps = build(ledger)
    metrics = Metrics()
    async with run_apps(*apps, broker=broker_url, middleware=[metrics]) as env:
        done = await coordinator.start_saga("order_processing", {"total": 1}, saga_id="r-1", timeout=20)
        await env.settle(timeout=10)
        replies = env.published("saga.reply.order_processing")
        # Replayed within the saga's transaction (its correlation id), as a
        # broker redelivering or a participant replying again would.
        within = {"correlation_id": replies[0].correlation_id}
        for reply in replies:
            await env.publish(reply.type, reply.data, saga_id=reply.saga_id, **within)
        await env.publish(replies[0].type, replies[0].data, saga_id="ghost")
        forged = {**replies[0].data, "token": 999, "outcome": "failed"}
        await env.publish(replies[0].type, forged, saga_id="r-1", **within)
        await env.publish(replies[0].type, {**replies[0].data, "step": "no_such_step"}, saga_id="r-1", **within)
        await env.settle(timeout=10)
        assert await coordinator.get_saga_state("r-1") == done
        assert env.dead_letters() == []
        assert len(env.published("saga.order_processing.completed")) == 1
    assert set(ledger.values()) == {1}
    messages = [r.getMessage() for r in caplog.records]
    assert "[SAGA-ghost] ignoring saga.reply.order_processing for an unknown saga" in messages
    assert any("[SAGA-r-1] ignoring a stale or duplicate reply" in m for m in messages)
    assert "[SAGA-r-1] ignoring a reply for unknown step 'no_such_step'" in messages

    def ignored(reason: str) -> float | None:
        labels = {"saga": "order_processing", "reason": reason}
        return metrics.registry.get_sample_value("choreo_saga_replies_ignored_total", labels)

    assert (ignored("unknown_saga"), ignored("unknown_step")) == (1.0, 1.0)
    assert ignored("stale") == len(replies) + 1  # every replayed reply and the forged one


async def test_concurrent_sagas_each_finish_with_effects_once(broker_url: str) -> None:
    """Thirty sagas at once all end, and compare-and-set keeps every record consistent."""
    ledger: dict[str, int] = {}
    # Steps get 5 s, not 1 s: thirty sagas through 16 slots on a loaded
    # machine must not time out a step that is merely queued (no step here
    # is meant to time out).
    coordinator, apps = build(ledger, step_timeout=5.0)
    async with run_apps(*apps, broker=broker_url, concurrency=16):
        results = await asyncio.gather(
            *(
                coordinator.start_saga("order_processing", {"total": 50 + 10 * (i % 10)}, saga_id=f"c-{i}", timeout=30)
                for i in range(30)
            )
        )
    states = [r.state for r in results]
    assert states.count(SagaState.COMPLETED) == 18 and states.count(SagaState.COMPENSATED) == 12
    assert set(ledger.values()) == {1}


async def test_wait_polls_a_saga_finished_by_another_process(broker_url: str) -> None:
    """A caller that does not run the coordinator's handlers still sees the saga end, by polling."""
    coordinator, apps = build({})
    async with run_apps(*apps, broker=broker_url) as env:
        started = await coordinator.start_saga("order_processing", {"total": 1}, saga_id="p-1", wait=False)
        assert started.state is SagaState.RUNNING
        await env.settle(timeout=10)
        coordinator._waiters.futures.clear()  # as if another process ran the saga
        result = await coordinator.start_saga("order_processing", {"total": 1}, saga_id="p-1", timeout=10)
    assert result.state is SagaState.COMPLETED


async def test_sweeper_fires_the_timer_of_an_overdue_step(broker_url: str) -> None:
    """A saga whose step is overdue with its timer lost is moved on by the sweeper."""
    ledger: dict[str, int] = {}
    coordinator, apps = build(ledger, sweep_interval=0.2)
    async with run_apps(*apps, broker=broker_url) as env:
        # A record waiting on a command (token 5) that was never delivered, overdue, with no timer left.
        from choreo.saga.record import Kind, new_record

        record = new_record(coordinator.definition("order_processing"), "lost", {"total": 1}, time.time() - 10)
        record.state, record.cursor, record.token, record.kind = SagaState.RUNNING, 1, 5, Kind.ACTION
        record.attempt, record.due_at = 1, time.time() - 5
        record.steps[0].status, record.steps[0].attempts = StepStatus.SUCCEEDED, 1
        record.steps[1].status, record.steps[1].attempts = StepStatus.RUNNING, 1
        # Written in the saga's transaction, as start_saga's commit does (its
        # first event carries the correlation id): a broker with partitions
        # keeps the record where the saga's events go.
        marker = Message("saga.test.marker", "lost-marker", b"{}", key=record.correlation)
        await env.broker.commit(publish=[marker], state=[StateWrite("saga:lost", record.to_json(), 0)])
        assert await coordinator.sweep() == 1
        deadline = time.monotonic() + 10
        while (await coordinator.get_saga_state("lost")).state is SagaState.RUNNING:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        await env.settle(timeout=10)
        result = await coordinator.get_saga_state("lost")
    assert result.state is SagaState.COMPLETED  # the timeout counted as a failed attempt, the retry went through
    assert result.step("process_payment").attempts == 2
    assert ledger == {"lost:process_payment:charge_card": 1, "lost:ship:ship": 1}


async def test_persistence_off_forgets_finished_sagas(broker_url: str) -> None:
    """With persistence=False the result still reaches the waiter, and the record is gone afterwards."""
    coordinator, apps = build({}, persistence=False)
    async with run_apps(*apps, broker=broker_url) as env:
        result = await coordinator.start_saga("order_processing", {"total": 1}, saga_id="np", timeout=20)
        await env.settle(timeout=10)
        with pytest.raises(SagaNotFound):
            await coordinator.get_saga_state("np")
    assert result.state is SagaState.COMPLETED and result.data["tracking"] == "T-1"


async def test_command_events_carry_the_idempotency_key_header(broker_url: str) -> None:
    """Commands are saga.cmd.<service>.<action> events with the saga id and an idempotency_key header."""
    coordinator, apps = build({})
    async with run_apps(*apps, broker=broker_url) as env:
        await coordinator.start_saga("order_processing", {"total": 1}, saga_id="h-1", timeout=20)
        await env.settle(timeout=10)
        commands: list[Event] = [e for e in env.published() if e.type.startswith("saga.cmd.")]
    assert [(e.type, e.saga_id, e.headers["idempotency_key"]) for e in commands] == [
        ("saga.cmd.order_service.create_order", "h-1", "h-1:create_order:create_order"),
        ("saga.cmd.payment_service.charge_card", "h-1", "h-1:process_payment:charge_card"),
        ("saga.cmd.order_service.ship", "h-1", "h-1:ship:ship"),
    ]
