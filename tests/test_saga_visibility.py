"""Compensation you can see: attempts, errors and timings per step, and lifecycle events for its start and end."""

from __future__ import annotations

from typing import Any

from choreo import App, SagaCoordinator, SagaState, SagaStep
from choreo.testing import run_apps


async def test_compensation_attempts_errors_and_timings_are_in_the_result(broker_url: str) -> None:
    """A compensation that fails once then succeeds shows 2 attempts, its error and its timings,
    apart from the action's own; compensating and compensated events bracket it."""
    failures = {"release": 1}
    shop = App("shop")
    coordinator = SagaCoordinator(shop)
    policy: dict[str, Any] = {"timeout": 2.0, "retry_count": 1, "retry_delay": 0.0}
    coordinator.define_saga(
        "order",
        [
            SagaStep("reserve", "shop", "reserve", "release", **policy),
            SagaStep("charge", "shop", "charge", "refund", **policy),
        ],
    )

    @shop.action("reserve")
    async def reserve() -> None:
        return None

    @shop.action("release")
    async def release() -> None:
        if failures["release"]:
            failures["release"] -= 1
            raise ConnectionError("warehouse unreachable")

    @shop.action("charge")
    async def charge() -> None:
        raise ValueError("card declined")

    async with run_apps(shop, broker=broker_url) as env:
        result = await coordinator.start_saga("order", {}, saga_id="v-1", timeout=20)
        await env.settle(timeout=10)
        lifecycle = [e.type for e in env.published() if e.type.startswith("saga.order.")]
        compensating = env.published("saga.order.compensating")[0]
    assert result.state is SagaState.COMPENSATED
    reserve_step, charge_step = result.step("reserve"), result.step("charge")
    assert (reserve_step.status, reserve_step.attempts, reserve_step.error) == ("compensated", 1, None)
    assert reserve_step.compensation_attempts == 2
    assert reserve_step.compensation_error == {"type": "builtins.ConnectionError", "message": "warehouse unreachable"}
    assert reserve_step.finished_at is not None and reserve_step.compensation_started_at is not None
    assert reserve_step.finished_at <= reserve_step.compensation_started_at
    assert reserve_step.compensation_finished_at is not None
    assert reserve_step.compensation_started_at <= reserve_step.compensation_finished_at
    assert charge_step.status == "failed" and charge_step.compensation_attempts == 0
    assert charge_step.error == {"type": "builtins.ValueError", "message": "card declined"}
    assert lifecycle == ["saga.order.started", "saga.order.compensating", "saga.order.compensated"]
    assert compensating.data["state"] == "compensating" and compensating.data["error"]["step"] == "charge"
