"""Saga definitions: validation at definition time and the compiled routing table."""

from __future__ import annotations

import pytest

import choreo
from choreo import App, ConfigurationError, SagaCoordinator, SagaState, SagaStep
from choreo.saga.choreography import compensations


def steps() -> list[SagaStep]:
    return [
        SagaStep("create_order", "order_service", "create_order", "cancel_order"),
        SagaStep("charge", "payment_service", "charge_card", "refund_card", fallback="charge_backup"),
    ]


def test_saga_names_are_exported_from_choreo() -> None:
    """The orchestration names of the public contract are importable from choreo."""
    for name in ("SagaCoordinator", "SagaStep", "SagaState", "SagaResult", "StepResult"):
        assert name in choreo.__all__
        assert getattr(choreo, name) is not None
    from choreo.testing import SagaTestHarness

    assert SagaTestHarness.__name__ == "SagaTestHarness"


def test_saga_step_has_the_documented_defaults() -> None:
    """SagaStep takes name, service, action, compensation positionally with the documented defaults."""
    step = SagaStep("a", "svc", "do_a")
    assert (step.compensation, step.timeout, step.retry_count, step.retry_delay) == (None, 30.0, 3, 1.0)
    assert (step.fallback, step.compensatable) == (None, True)
    assert SagaState.COMPLETED.terminal and not SagaState.RUNNING.terminal


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: SagaStep("a", "svc", "do_a", "do_a"), "is the action itself"),
        (lambda: SagaStep("a", "svc", "do_a", fallback="do_a"), "is the action itself"),
        (lambda: SagaStep("a", "svc", "do_a", retries=3), "unknown options"),
        (lambda: SagaStep("a", "svc", "do_a", timeout=0), "timeout"),
        (lambda: SagaStep("a", "svc", "do_a", retry_count=-1), "retry_count"),
        (lambda: SagaStep("a b", "svc", "do_a"), "step name"),
    ],
)
def test_invalid_step_is_a_configuration_error(build, message) -> None:  # type: ignore[no-untyped-def]
    """A bad step fails when it is written, with a message naming the problem."""
    with pytest.raises(ConfigurationError, match=message):
        build()


@pytest.mark.parametrize(
    ("name", "step_list", "options", "message"),
    [
        ("s", [], {}, "no steps"),
        ("s", [SagaStep("a", "x", "do"), SagaStep("a", "y", "do")], {}, "duplicate step names a"),
        ("s", [SagaStep("a", "x", "do")], {"timeout": 3}, "unknown options timeout"),
        ("reply", [SagaStep("a", "x", "do")], {}, "reserved"),
        ("s", ["not a step"], {}, "not a SagaStep"),
    ],
)
def test_invalid_saga_is_a_configuration_error(name, step_list, options, message) -> None:  # type: ignore[no-untyped-def]
    """define_saga rejects empty, duplicate, reserved or unknown-option definitions."""
    coordinator = SagaCoordinator(App("orders"))
    with pytest.raises(ConfigurationError, match=message):
        coordinator.define_saga(name, step_list, **options)


def test_saga_defined_twice_is_a_configuration_error() -> None:
    """A saga name is unique per coordinator, and an app has one coordinator."""
    app = App("orders")
    coordinator = SagaCoordinator(app)
    coordinator.define_saga("s", steps())
    with pytest.raises(ConfigurationError, match="already defined"):
        coordinator.define_saga("s", steps())
    with pytest.raises(ConfigurationError, match="already has a SagaCoordinator"):
        SagaCoordinator(app)


def test_saga_compiles_to_reply_and_timeout_routes_in_the_coordinator_app() -> None:
    """The compiled chain shows in app.routes: replies and timers consumed, commands and lifecycle emitted."""
    app = App("order_service")
    SagaCoordinator(app).define_saga("order_processing", steps())
    by_event = {route.event: route for route in app.routes}
    reply = by_event["saga.reply.order_processing"]
    assert "saga.timeout.order_processing" in by_event
    assert reply.emits[:4] == (
        "saga.cmd.order_service.create_order",
        "saga.cmd.order_service.cancel_order",
        "saga.cmd.payment_service.charge_card",
        "saga.cmd.payment_service.charge_backup",
    )
    for what in ("completed", "compensated", "failed"):
        assert f"saga.order_processing.{what}" in reply.emits


def test_action_registers_a_command_route_without_retries() -> None:
    """@app.action consumes saga.cmd.<service>.<action>, retries=0, and returns the function unchanged."""
    payments = App("payment_service")

    async def charge_card(data: dict, saga_id: str) -> dict:  # type: ignore[type-arg]
        return {"payment_id": "P"}

    assert payments.action("charge_card")(charge_card) is charge_card
    (route,) = payments.routes
    assert route.event == "saga.cmd.payment_service.charge_card"
    assert route.retries == 0
    assert "saga.reply.order_processing" in route.emits


def test_action_with_an_uninjectable_parameter_is_a_configuration_error() -> None:
    """Actions inject parameters like any handler and fail at registration otherwise."""
    with pytest.raises(ConfigurationError, match="cannot inject parameter 'amount'"):

        @App("payment_service").action("charge_card")
        async def charge_card(amount: float) -> None: ...


def test_compensates_declares_a_compensation_route_for_a_failure_event() -> None:
    """@app.compensates subscribes the handler to the failure event and records what it undoes."""
    inventory = App("inventory_service")

    @inventory.on_event("order.placed")
    @inventory.emits("stock.reserved", "stock.unavailable")
    async def reserve(data: dict) -> None: ...  # type: ignore[type-arg]

    @inventory.emits("stock.released")
    @inventory.compensates(reserve, on="payment.declined")
    async def release(data: dict) -> None: ...  # type: ignore[type-arg]

    route = next(r for r in inventory.routes if r.event == "payment.declined")
    assert route.emits == ("stock.released",) and route.retries == 10
    assert [(c.target, c.trigger, c.handler) for c in compensations(inventory)] == [
        ("reserve", "payment.declined", "release")
    ]
    with pytest.raises(ConfigurationError, match="not a handler"):
        inventory.compensates("nothing", on="x.failed")(release)
    with pytest.raises(ConfigurationError, match="not a failure"):
        inventory.compensates(reserve, on="order.placed")(release)
