"""The lifecycle on both brokers: apps attach to the runtime that runs them,
lifespan hooks are entered after connecting and before consuming and exited in
reverse after draining, and whatever a hook starts stops with the runtime."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

import choreo
from choreo import App, ChoreoError, ConfigurationError, Context, Event, Middleware, Router, SagaCoordinator, SagaStep
from choreo.actions import Compensation
from choreo.lifecycle import Running
from choreo.options import RuntimeOptions
from choreo.saga.choreography import compensations
from choreo.saga.coordinator import coordinator_of
from choreo.testing import SagaTestHarness, run_apps


def recording_hook(log: list[str], name: str) -> Any:
    @contextlib.asynccontextmanager
    async def hook(runtime: Running) -> AsyncIterator[None]:
        log.append(f"enter {name}")
        try:
            yield
        finally:
            log.append(f"exit {name}")

    return hook


async def test_hooks_enter_in_order_before_consuming_and_exit_in_reverse_after_draining(broker_url: str) -> None:
    """Run hooks come first, then each app's in the order added; exits mirror
    the entries, after the handler still running at the stop has finished."""
    log: list[str] = []
    first, second = App("first"), App("second")

    @first.on_event("job.started")
    async def work(data: dict[str, Any]) -> None:
        log.append("handling")
        await asyncio.sleep(0.2)
        log.append("handled")

    @contextlib.asynccontextmanager
    async def publish_at_start(runtime: Running) -> AsyncIterator[None]:
        # The apps are attached and the broker connected, but nothing is consumed yet.
        await first.publish("job.started", {})
        await asyncio.sleep(0.3)
        log.append(f"enter publisher, in flight {runtime.in_flight}")
        yield
        log.append("exit publisher")

    first.lifespan(recording_hook(log, "a"))
    first.lifespan(publish_at_start)
    second.lifespan(recording_hook(log, "b"))
    async with run_apps(first, second, broker=broker_url, lifespan=[recording_hook(log, "run")], grace=5):
        while "handling" not in log:
            await asyncio.sleep(0.01)
    assert log == [
        "enter run", "enter a", "enter publisher, in flight 0", "enter b",
        "handling", "handled",
        "exit b", "exit publisher", "exit a", "exit run",
    ]


async def test_tasks_middleware_and_extensions_of_a_hook_stop_with_the_runtime(broker_url: str) -> None:
    """A task started by a hook is cancelled after draining and before the hook
    exits; middleware and extensions it added are gone once the runtime stops."""
    seen: dict[str, Any] = {}
    app = App("svc")

    async def forever() -> None:
        await asyncio.Event().wait()

    class Seen(Middleware):
        def on_publish(self, event: Event) -> None:
            seen.setdefault("published", []).append(event.type)

    @contextlib.asynccontextmanager
    async def plug_in(runtime: Running) -> AsyncIterator[None]:
        seen["task"] = runtime.start_task(forever(), name="plug-in-task")
        runtime.add_middleware(Seen())
        runtime.extensions["greeting"] = "hello"
        yield
        seen["task done at exit"] = seen["task"].done()

    @app.on_event("ping.sent")
    async def answer(ctx: Context) -> None:
        seen["extension"] = ctx.extensions.get("greeting")

    app.lifespan(plug_in)
    async with run_apps(app, broker=broker_url) as env:
        await env.publish("ping.sent", {})
        await env.settle()
        assert not seen["task"].done()
        runtime = env.runtime
    assert seen["extension"] == "hello"
    assert seen["published"] == ["ping.sent"]
    assert seen["task"].cancelled()
    assert seen["task done at exit"] is True
    assert not any(isinstance(m, Seen) for m in runtime.middleware)
    assert runtime.extensions == {}
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "plug-in-task"]


async def test_a_hook_failing_to_start_leaves_nothing_running(broker_url: str) -> None:
    """When a hook raises on entry, the run raises it, the hooks entered before
    are exited, their tasks cancelled, and the app is not running."""
    log: list[str] = []
    started: list[asyncio.Task[None]] = []
    app = App("svc")

    @contextlib.asynccontextmanager
    async def starts_a_task(runtime: Running) -> AsyncIterator[None]:
        started.append(runtime.start_task(asyncio.sleep(3600), name="plug-in-task"))
        log.append("enter")
        yield
        log.append("exit")

    @contextlib.asynccontextmanager
    async def broken(runtime: Running) -> AsyncIterator[None]:
        raise RuntimeError("cannot start")
        yield  # pragma: no cover

    @contextlib.asynccontextmanager
    async def never_reached(runtime: Running) -> AsyncIterator[None]:
        log.append("never")
        yield

    @app.on_event("job.started")
    async def work() -> None:
        log.append("handled")

    app.lifespan(starts_a_task)
    app.lifespan(broken)
    app.lifespan(never_reached)
    with pytest.raises(RuntimeError, match="cannot start"):
        async with choreo.run(app, broker=broker_url):
            pytest.fail("the block must not run")
    assert log == ["enter", "exit"]
    assert started[0].cancelled()
    assert not app.running
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith(("plug-in", "choreo-"))]
    with pytest.raises(ChoreoError, match="not running"):
        await app.publish("job.started", {})


async def test_app_publishes_through_the_runtime_running_it_and_only_then(broker_url: str) -> None:
    """App.publish goes through the attached runtime, and raises a clear
    ChoreoError before start and after stop."""
    app = App("svc")
    with pytest.raises(ChoreoError, match="start it with"):
        await app.publish("order.created", {})
    async with run_apps(app, broker=broker_url) as env:
        assert app.running
        event = await app.publish("order.created", {"id": 1})
        await env.settle()
    assert [e.id for e in env.published("order.created")] == [event.id]
    assert not app.running
    with pytest.raises(ChoreoError, match="not running"):
        await app.publish("order.created", {})


async def test_the_saga_sweeper_belongs_to_the_runtime(broker_url: str) -> None:
    """The coordinator is a plug-in of its app: its sweeper runs while a runtime
    runs the app and stops with it; its sagas need the app running."""
    orders = App("order_service")
    coordinator = SagaCoordinator(orders, sweep_interval=0.05)
    coordinator.define_saga("noop", [SagaStep("one", "order_service", "one", None, compensatable=False)])
    assert coordinator_of(orders) is coordinator
    with pytest.raises(ConfigurationError, match="already has a SagaCoordinator"):
        SagaCoordinator(orders)

    def sweepers() -> list[asyncio.Task[Any]]:
        return [t for t in asyncio.all_tasks() if t.get_name() == "choreo-saga-sweeper" and not t.done()]

    async with run_apps(orders, broker=broker_url):
        assert len(sweepers()) == 1
        assert await coordinator.sweep() == 0
    assert sweepers() == []
    with pytest.raises(ChoreoError, match="not running"):
        await coordinator.start_saga("noop", {})


async def test_the_harness_clock_and_interceptor_stop_with_its_runtime() -> None:
    """SagaTestHarness's virtual clock is a task of its runtime: closing the
    harness stops it, and the action interceptor is gone with the runtime."""
    orders = App("order_service")
    coordinator = SagaCoordinator(orders)
    coordinator.define_saga("noop", [SagaStep("one", "order_service", "one", None, compensatable=False)])

    @orders.action("one")
    async def one() -> dict[str, Any]:
        return {}

    async with SagaTestHarness(orders) as harness:
        await harness.start_saga("noop", {})
        assert harness.calls("order_service", "one") == [{}]
        runtime = harness.runtime
        assert [t for t in asyncio.all_tasks() if t.get_name() == "choreo-virtual-clock"]
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "choreo-virtual-clock" and not t.done()]
    assert runtime.extensions == {}


def test_runtime_options_are_checked_once_for_every_entry_point() -> None:
    """Out-of-range options raise ConfigurationError, unknown ones TypeError,
    whether given as a record or as keywords."""
    with pytest.raises(ConfigurationError, match="concurrency"):
        RuntimeOptions(concurrency=0)
    with pytest.raises(ConfigurationError, match="poll_interval"):
        RuntimeOptions.of(poll_interval=0)
    with pytest.raises(TypeError, match="colour"):
        RuntimeOptions.of(colour="blue")
    options = RuntimeOptions.of(RuntimeOptions(concurrency=3), grace=1.5)
    assert (options.concurrency, options.grace) == (3, 1.5)


async def test_run_rejects_an_unknown_option_without_connecting() -> None:
    """choreo.run refuses a keyword that is not an option before touching the broker."""
    with pytest.raises(TypeError, match="colour"):
        async with choreo.run(App("svc"), broker="redis://127.0.0.1:1/0", colour="blue"):
            pytest.fail("the block must not run")


def test_actions_and_compensations_on_a_router_join_the_including_service() -> None:
    """Router.action and Router.compensates build core routes; included into an
    app, actions consume that service's commands and compensations are listed
    for it."""
    router = Router("module")

    @router.on_event("order.placed")
    async def reserve(data: dict[str, Any]) -> None: ...

    @router.compensates(reserve, on="payment.declined")
    async def release(data: dict[str, Any]) -> None: ...

    @router.action("charge_card")
    async def charge(data: dict[str, Any]) -> dict[str, Any]:
        return {}

    app = App("payment_service")
    app.include_router(router)
    topics = sorted(r.event for r in app.routes)
    assert topics == ["order.placed", "payment.declined", "saga.cmd.payment_service.charge_card"]
    assert compensations(app) == [Compensation("payment_service", "reserve", "payment.declined", "release")]
