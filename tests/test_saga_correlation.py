"""What actions and events of a saga know: the step's attempt, and the correlation id it inherited."""

from __future__ import annotations

import asyncio
from typing import Any

from choreo import App, Context, SagaCoordinator, SagaState, SagaStep
from choreo.testing import run_apps


async def test_ctx_attempt_is_the_steps_attempt_of_that_action(broker_url: str) -> None:
    """An action sees attempts 1, 2, 3 as the step retries it; its compensation counts its own."""
    seen: dict[str, list[int]] = {"charge": [], "refund": [], "ship": []}
    shop = App("shop")
    coordinator = SagaCoordinator(shop)
    policy: dict[str, Any] = {"timeout": 2.0, "retry_count": 2, "retry_delay": 0.0}
    coordinator.define_saga(
        "order",
        [SagaStep("charge", "shop", "charge", "refund", **policy), SagaStep("ship", "shop", "ship", None, **policy)],
    )

    @shop.action("charge")
    async def charge(ctx: Context) -> None:
        seen["charge"].append(ctx.attempt)
        if ctx.attempt < 3:
            raise ConnectionError("try again")

    @shop.action("refund")
    async def refund(ctx: Context) -> None:
        seen["refund"].append(ctx.attempt)
        if ctx.attempt < 2:
            raise ConnectionError("try again")

    @shop.action("ship")
    async def ship(ctx: Context) -> None:
        seen["ship"].append(ctx.attempt)
        raise RuntimeError("no courier")

    async with run_apps(shop, broker=broker_url):
        result = await coordinator.start_saga("order", {}, timeout=20)
    assert result.state is SagaState.COMPENSATED
    assert seen == {"charge": [1, 2, 3], "refund": [1, 2], "ship": [1, 2, 3]}


def shop_with_trigger() -> tuple[App, SagaCoordinator, list[str]]:
    shop = App("shop")
    coordinator = SagaCoordinator(shop)
    coordinator.define_saga("order", [SagaStep("charge", "shop", "charge", "refund", timeout=1.0, retry_count=0)])
    started: list[str] = []

    @shop.action("charge")
    async def charge() -> dict[str, Any]:
        return {"charged": True}

    @shop.on_event("order.placed")
    async def place(data: dict[str, Any]) -> None:
        result = await coordinator.start_saga("order", data, saga_id=data["order"], wait=False)
        started.append(result.saga_id)

    return shop, coordinator, started


async def test_a_saga_started_in_a_handler_carries_its_correlation_id(broker_url: str) -> None:
    """Commands, replies, timers and lifecycle events of a saga started by a handler carry the
    handler's event's correlation id, and so does SagaResult."""
    shop, coordinator, started = shop_with_trigger()
    async with run_apps(shop, broker=broker_url) as env:
        await env.publish("order.placed", {"order": "O-1"}, correlation_id="checkout-42")
        await env.settle(timeout=10)
        result = await coordinator.get_saga_state("O-1")
        saga_events = [e for e in env.published() if e.saga_id == "O-1"]
    assert started == ["O-1"] and result.state is SagaState.COMPLETED
    assert result.correlation_id == "checkout-42" and result.version == 1
    types = {e.type for e in saga_events}
    assert {"saga.cmd.shop.charge", "saga.reply.order", "saga.timeout.order", "saga.order.completed"} <= types
    assert {e.correlation_id for e in saga_events} == {"checkout-42"}


async def test_start_saga_correlation_id_is_explicit_or_the_saga_id(broker_url: str) -> None:
    """start_saga(correlation_id=...) sets it; outside a handler it defaults to the saga id."""
    shop, coordinator, _ = shop_with_trigger()
    async with run_apps(shop, broker=broker_url) as env:
        given, default = await asyncio.gather(
            coordinator.start_saga("order", {}, saga_id="S-1", correlation_id="req-7", timeout=10),
            coordinator.start_saga("order", {}, saga_id="S-2", timeout=10),
        )
        await env.settle(timeout=10)
        by_saga = {e.saga_id: e.correlation_id for e in env.published("saga.order.completed")}
    assert (given.correlation_id, default.correlation_id) == ("req-7", "S-2")
    assert by_saga == {"S-1": "req-7", "S-2": "S-2"}
