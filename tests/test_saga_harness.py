"""Saga semantics on SagaTestHarness: recovery, retries, timeouts and the virtual clock."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest

from choreo import App, ConfigurationError, Context, SagaCoordinator, SagaState, SagaStep
from choreo.testing import SagaTestHarness


def order_saga(**payment: Any) -> tuple[App, SagaCoordinator]:
    orders = App("order_service")
    coordinator = SagaCoordinator(orders)
    coordinator.define_saga(
        "order_processing",
        [
            SagaStep("create_order", "order_service", "create_order", "cancel_order"),
            SagaStep("reserve_inventory", "inventory_service", "reserve_inventory", "release_inventory"),
            SagaStep("process_payment", "payment_service", "charge_card", "refund_card", **payment),
            SagaStep("send_email", "notification_service", "send_confirmation", None, compensatable=False),
        ],
    )
    return orders, coordinator


async def test_saga_completes_with_stubbed_actions_and_no_setup() -> None:
    """A harness built from the coordinator app alone stubs every action and completes the saga."""
    orders, _ = order_saga()
    harness = SagaTestHarness(orders)
    try:
        result = await harness.start_saga("order_processing", {"total": 10})
        assert result.state is SagaState.COMPLETED
        assert [s.status for s in result.steps] == ["succeeded"] * 4
        assert harness.was_called("payment_service", "charge_card")
        assert not harness.was_called("payment_service", "refund_card")
    finally:
        await harness.close()


async def test_action_result_merges_into_data_that_later_steps_receive() -> None:
    """A participant's returned dict is merged into the saga data passed to the next steps."""
    orders, _ = order_saga()
    payments = App("payment_service")

    @payments.action("charge_card")
    async def charge_card(data: dict[str, Any], saga_id: str) -> dict[str, Any]:
        return {"payment_id": f"PAY-{saga_id}"}

    async with SagaTestHarness(orders, payments) as harness:
        result = await harness.start_saga("order_processing", {"total": 10}, saga_id="s-1")
    assert result.data == {"total": 10, "payment_id": "PAY-s-1"}
    assert harness.calls("notification_service", "send_confirmation") == [{"total": 10, "payment_id": "PAY-s-1"}]


async def test_failed_step_compensates_completed_steps_in_reverse_order() -> None:
    """Backward recovery undoes the completed steps, last first, and not the failed step itself."""
    orders, _ = order_saga()
    async with SagaTestHarness(orders) as harness:
        harness.configure_failure("payment_service", "charge_card", error=ValueError("declined"))
        result = await harness.start_saga("order_processing", {"total": 10})
        compensations = [e.type for e in harness.published() if e.type.startswith("saga.cmd.")][-2:]
    assert result.state is SagaState.COMPENSATED
    assert compensations == ["saga.cmd.inventory_service.release_inventory", "saga.cmd.order_service.cancel_order"]
    assert [s.status for s in result.steps] == ["compensated", "compensated", "failed", "pending"]
    assert not harness.was_called("payment_service", "refund_card")
    assert result.error == {"step": "process_payment", "type": "builtins.ValueError", "message": "declined"}


async def test_first_step_failing_compensates_nothing() -> None:
    """If the first step fails there is nothing to undo and the saga is COMPENSATED."""
    orders, _ = order_saga()
    async with SagaTestHarness(orders) as harness:
        harness.configure_failure("order_service", "create_order")
        result = await harness.start_saga("order_processing", {})
    assert result.state is SagaState.COMPENSATED
    assert not harness.was_called("order_service", "cancel_order")


async def test_fallback_runs_after_retries_and_counts_as_done() -> None:
    """Forward recovery: the fallback runs once the action's attempts are spent, and the saga completes."""
    orders, _ = order_saga(retry_count=2, fallback="charge_backup_method")
    async with SagaTestHarness(orders) as harness:
        harness.configure_failure("payment_service", "charge_card")
        result = await harness.start_saga("order_processing", {})
    assert result.state is SagaState.COMPLETED
    assert len(harness.calls("payment_service", "charge_card")) == 3
    assert len(harness.calls("payment_service", "charge_backup_method")) == 1
    assert result.step("process_payment").attempts == 4


async def test_not_compensatable_step_is_skipped_and_reported() -> None:
    """A compensatable=False step is skipped during compensation and reported as skipped."""
    orders = App("order_service")
    SagaCoordinator(orders).define_saga(
        "s",
        [
            SagaStep("email", "mail", "send", "unsend", compensatable=False),
            SagaStep("charge", "pay", "charge", "refund"),
        ],
    )
    async with SagaTestHarness(orders) as harness:
        harness.configure_failure("pay", "charge")
        result = await harness.start_saga("s", {})
    assert result.state is SagaState.COMPENSATED
    assert result.step("email").status == "skipped"
    assert not harness.was_called("mail", "unsend")


async def test_minute_long_backoffs_run_in_milliseconds_on_the_virtual_clock() -> None:
    """Retry backoff of minutes completes in well under a second of real time."""
    orders, _ = order_saga(retry_count=3, retry_delay=60.0)
    async with SagaTestHarness(orders) as harness:
        harness.configure_failure("payment_service", "charge_card", times=3)
        started = time.monotonic()
        result = await harness.start_saga("order_processing", {})
        elapsed = time.monotonic() - started
    assert result.state is SagaState.COMPLETED
    assert result.step("process_payment").attempts == 4
    assert elapsed < 2.0


async def test_idempotency_key_is_the_same_on_every_attempt() -> None:
    """Every attempt of an action sees ctx.idempotency_key = saga id + step + action."""
    orders, _ = order_saga(retry_count=2, retry_delay=1.0)
    payments = App("payment_service")
    seen: list[tuple[str, int]] = []

    @payments.action("charge_card")
    async def charge_card(ctx: Context) -> None:
        seen.append((ctx.idempotency_key, len(seen)))
        if len(seen) < 3:
            raise ConnectionError("issuer unreachable")

    async with SagaTestHarness(orders, payments) as harness:
        result = await harness.start_saga("order_processing", {}, saga_id="order-7")
    assert result.state is SagaState.COMPLETED
    assert {key for key, _ in seen} == {"order-7:process_payment:charge_card"}
    assert len(seen) == 3


async def test_step_timeout_is_a_failed_attempt_and_a_late_reply_is_ignored() -> None:
    """No reply within timeout fails the attempt; the retry's reply completes the step."""
    orders, _ = order_saga(timeout=0.2, retry_count=1)
    payments = App("payment_service")
    calls = []

    @payments.action("charge_card")
    async def charge_card() -> dict[str, Any]:
        calls.append(1)
        if len(calls) == 1:
            await asyncio.sleep(0.6)  # real time: the handler is running, the clock waits for the timer
            return {"charged_by": "first"}
        return {"charged_by": "second"}

    async with SagaTestHarness(orders, payments) as harness:
        result = await harness.start_saga("order_processing", {})
        await harness.run_until_idle()
    assert result.state is SagaState.COMPLETED
    assert result.data["charged_by"] == "second"
    assert result.step("process_payment").attempts == 2


async def test_step_that_completes_after_giving_up_is_told_to_compensate() -> None:
    """A success reply after the step failed on timeout sends that step's compensation."""
    orders, _ = order_saga(timeout=0.1)
    payments = App("payment_service")

    @payments.action("charge_card")
    async def charge_card() -> dict[str, Any]:
        await asyncio.sleep(0.4)
        return {"payment_id": "late"}

    async with SagaTestHarness(orders, payments) as harness:
        result = await harness.start_saga("order_processing", {})
        await harness.run_until_idle()
    assert result.state is SagaState.COMPENSATED
    assert harness.calls("payment_service", "refund_card")[0]["payment_id"] == "late"


async def test_compensation_failing_transiently_is_retried_to_compensated() -> None:
    """T11: a compensation failing k times within its retries ends COMPENSATED, applied once."""
    inventory = App("inventory_service")
    released: dict[str, int] = {}
    failures = [2]

    @inventory.action("release_inventory")
    async def release(ctx: Context) -> None:
        if failures[0]:
            failures[0] -= 1
            raise ConnectionError("warehouse offline")
        released[ctx.idempotency_key] = released.get(ctx.idempotency_key, 0) + 1

    orders = App("order_service")
    SagaCoordinator(orders).define_saga(
        "t11",
        [
            SagaStep(
                "reserve_inventory",
                "inventory_service",
                "reserve_inventory",
                "release_inventory",
                retry_count=3,
                retry_delay=30.0,
            ),
            SagaStep("charge", "payment_service", "charge_card", None),
        ],
    )
    async with SagaTestHarness(orders, inventory) as harness:
        harness.configure_failure("payment_service", "charge_card")
        result = await harness.start_saga("t11", {}, saga_id="t11-1")
    assert result.state is SagaState.COMPENSATED
    assert released == {"t11-1:reserve_inventory:release_inventory": 1}


async def test_compensation_past_its_retries_fails_the_saga_and_resume_finishes_it() -> None:
    """A compensation that keeps failing ends the saga FAILED (never COMPENSATED); resume_saga retries it."""
    orders = App("order_service")
    SagaCoordinator(orders).define_saga(
        "s",
        [
            SagaStep("reserve", "inventory", "reserve", "release", retry_count=1),
            SagaStep("cancel_mail", "mail", "hold", "unhold"),
            SagaStep("charge", "pay", "charge", "refund"),
        ],
    )
    async with SagaTestHarness(orders) as harness:
        harness.configure_failure("pay", "charge")
        harness.configure_failure("inventory", "release", times=2)
        result = await harness.start_saga("s", {}, saga_id="f-1")
        assert result.state is SagaState.FAILED
        assert result.step("reserve").status == "compensation_failed"
        assert result.step("cancel_mail").status == "compensated"
        assert result.compensation_failures == ["reserve"]
        assert [r.saga_id for r in await harness.coordinator("s").list_sagas("failed")] == ["f-1"]
        resumed = await harness.resume_saga("f-1")
    assert resumed.state is SagaState.COMPENSATED
    assert resumed.step("reserve").status == "compensated"
    assert len(harness.calls("inventory", "release")) == 3


async def test_saga_deadline_fails_the_running_step_and_compensates() -> None:
    """A saga-level deadline compensates a saga still running when it passes."""
    orders = App("order_service")
    SagaCoordinator(orders).define_saga(
        "slow",
        [
            SagaStep("a", "svc", "do_a", "undo_a"),
            SagaStep("b", "svc", "do_b", "undo_b", retry_count=50, retry_delay=60),
        ],
        deadline=600.0,
    )
    async with SagaTestHarness(orders) as harness:
        harness.configure_failure("svc", "do_b")
        result = await harness.start_saga("slow", {})
    assert result.state is SagaState.COMPENSATED
    assert "deadline" in result.error["message"]  # type: ignore[index]
    assert harness.was_called("svc", "undo_a")


async def test_trace_lines_are_logged_on_choreo_saga(caplog: pytest.LogCaptureFixture) -> None:
    """The documented trace lines appear on the choreo.saga logger."""
    orders, _ = order_saga()
    caplog.set_level(logging.INFO, logger="choreo.saga")
    async with SagaTestHarness(orders) as harness:
        harness.configure_failure("payment_service", "charge_card")
        await harness.start_saga("order_processing", {}, saga_id="X1")
    lines = [r.getMessage() for r in caplog.records if r.name == "choreo.saga"]
    assert "[SAGA-X1] Starting saga: order_processing" in lines
    assert "[SAGA-X1] Step 3/4: process_payment - FAILED" in lines
    assert "[SAGA-X1] Compensating: release_inventory" in lines
    assert lines[-1] == "[SAGA-X1] Saga compensated successfully"


async def test_wait_false_returns_running_and_timeout_raises() -> None:
    """start_saga(wait=False) returns at once; a wait past timeout raises TimeoutError and the saga goes on."""
    orders, coordinator = order_saga()
    payments = App("payment_service")
    gate = asyncio.Event()

    @payments.action("charge_card")
    async def charge_card() -> None:
        await gate.wait()

    async with SagaTestHarness(orders, payments) as harness:
        started = await harness.start_saga("order_processing", {}, saga_id="w-1", wait=False)
        assert started.state is SagaState.RUNNING
        with pytest.raises(TimeoutError):
            await harness.start_saga("order_processing", {}, saga_id="w-1", timeout=0.2)
        gate.set()
        final = await coordinator.start_saga("order_processing", {}, saga_id="w-1", timeout=10)
    assert final.state is SagaState.COMPLETED
    assert len(harness.calls("order_service", "create_order")) == 1


async def test_absent_participant_compensates_within_the_default_timeout_budget() -> None:
    """With the default step policy, a participant that never answers costs 4 attempts of 30 s
    plus backoff on the virtual clock, then the saga compensates: nothing hangs."""
    orders = App("order_service")
    SagaCoordinator(orders).define_saga(
        "order",
        [SagaStep("reserve", "inventory", "reserve", "release"), SagaStep("pay", "payments", "charge", "refund")],
    )
    absent = App("payments")

    @absent.on_event("saga.cmd.payments.charge")
    async def swallow(event: Any) -> None:
        """Takes the command and never replies: a participant that is gone or stuck."""

    async with SagaTestHarness(orders, absent) as harness:
        began_virtual, began_real = harness.clock(), time.monotonic()
        result = await harness.start_saga("order", {}, timeout=10)
        virtual, real = harness.clock() - began_virtual, time.monotonic() - began_real
    assert result.state is SagaState.COMPENSATED
    assert result.step("pay").attempts == 4 and result.step("pay").error["type"] == "TimeoutError"  # type: ignore[index]
    assert result.step("reserve").status == "compensated"
    # 4 x 30 s of timeouts and about 1 + 2 + 4 s of backoff (jitter x0.75 to x1.25); the
    # attempts above bound it. Not bounded above: once the saga has ended, the clock
    # may jump to a leftover timer before this task resumes.
    assert virtual >= 4 * 30 + 0.75 * 7
    assert real < 5


async def test_timeout_none_waits_for_a_slow_reply() -> None:
    """timeout=None is the explicit way to wait as long as the participant takes."""
    orders = App("order_service")
    SagaCoordinator(orders).define_saga("order", [SagaStep("pay", "payments", "charge", "refund", timeout=None)])
    payments = App("payments")

    @payments.action("charge")
    async def charge() -> dict[str, Any]:
        await asyncio.sleep(0.3)
        return {"paid": True}

    async with SagaTestHarness(orders, payments) as harness:
        result = await harness.start_saga("order", {}, timeout=10)
    assert result.state is SagaState.COMPLETED and result.step("pay").attempts == 1
    assert not harness.published("saga.timeout.order")


# -- the seed's spellings ---------------------------------------------------------


async def test_a_harness_with_no_apps_runs_the_coordinators_defined_so_far() -> None:
    """`SagaTestHarness()` finds the coordinators of the apps already defined,
    stubs their actions, and works as an async context manager."""
    shipping = App("harness_found_shipping")
    coordinator = SagaCoordinator(shipping, persistence_enabled=True, state_store=None, debug=False,
                                  trace_enabled=False)
    coordinator.define_saga("harness_found", [SagaStep("ship", "carrier_service", "book_carrier", "cancel_carrier")])
    async with SagaTestHarness() as harness:
        result = await harness.start_saga("harness_found", {"parcel": "P-1"})
        assert result.state is SagaState.COMPLETED
        assert harness.calls("carrier_service", "book_carrier") == [{"parcel": "P-1"}]


async def test_close_stops_every_task_the_harness_started() -> None:
    """Nothing the harness started (runtime loops, sweeper, virtual clock) outlives close()."""
    before = asyncio.all_tasks()
    orders, _ = order_saga()
    harness = SagaTestHarness(orders)
    await harness.start_saga("order_processing", {"total": 1})
    assert asyncio.all_tasks() - before
    await harness.close()
    assert asyncio.all_tasks() - before == set()


def test_persistence_enabled_is_the_seeds_name_for_persistence_and_state_store_must_be_a_store() -> None:
    off = SagaCoordinator(App("seed_spelling_off"), persistence_enabled=False)
    assert off.persistence is False
    assert SagaCoordinator(App("seed_spelling_on"), persistence_enabled=True, state_store=None).persistence
    with pytest.raises(ConfigurationError, match="is not a saga state store"):
        SagaCoordinator(App("seed_spelling_store"), state_store=object())
