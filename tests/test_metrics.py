"""Metrics: the DESIGN names, counted by a middleware with its own registry."""

from __future__ import annotations

import urllib.request
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from choreo import App, Emit, Event
from choreo.metrics import Metrics, start_metrics_server
from choreo.saga.metrics import SagaMetrics
from choreo.testing import run_apps
from tests.worker_process import sample


def build_app() -> App:
    app = App("pay")

    @app.on_event("charge.requested", retries=1, retry_delay=0.0)
    @app.emits("charge.done", "charge.failed")
    async def charge(data: dict[str, Any]) -> dict[str, Any] | Emit:
        if data.get("fail"):
            raise RuntimeError("declined")
        return {}

    @app.on_event("charge.failed", retries=0)
    async def explode(data: dict[str, Any]) -> None:
        raise RuntimeError("nobody can help")

    return app


def text(metrics: Metrics) -> str:
    return generate_latest(metrics.registry).decode()


async def test_handled_published_retry_failed_and_dead_lettered_are_counted() -> None:
    metrics = Metrics()
    async with run_apps(build_app(), middleware=[metrics]) as env:
        await env.publish("charge.requested", {"n": 1})
        await env.publish("charge.requested", {"fail": True})
        await env.settle(timeout=5)
        await metrics.refresh(env.broker, env.runtime.subscriptions)
    out = text(metrics)
    assert sample(out, "choreo_events_handled_total", service="pay", handler="charge", event="charge.requested",
                  outcome="success") == 1
    assert sample(out, "choreo_events_handled_total", handler="charge", outcome="retry") == 1
    assert sample(out, "choreo_events_handled_total", handler="charge", outcome="failed") == 1
    assert sample(out, "choreo_events_handled_total", handler="explode", outcome="dead_lettered") == 1
    assert sample(out, "choreo_events_published_total", event="charge.requested") == 2
    assert sample(out, "choreo_events_published_total", event="charge.done") == 1
    assert sample(out, "choreo_events_published_total", event="charge.failed") == 1
    assert sample(out, "choreo_handler_duration_seconds_count", handler="charge") == 3
    assert sample(out, "choreo_dead_lettered_total", handler="explode") == 1
    assert sample(out, "choreo_dead_letters") == 1
    assert sample(out, "choreo_stream_pending", stream="charge.requested", group="pay.charge") == 0


def test_each_instance_has_its_own_registry_unless_one_is_given() -> None:
    first, second = Metrics(), Metrics()
    first.on_publish(Event("a.b"))
    assert sample(text(first), "choreo_events_published_total", event="a.b") == 1
    assert sample(text(second), "choreo_events_published_total", event="a.b") == 0
    registry = CollectorRegistry()
    assert Metrics(registry).registry is registry


def test_saga_counters_come_from_lifecycle_events_and_step_durations_from_replies() -> None:
    metrics = Metrics()
    saga = SagaMetrics(metrics)
    saga.on_publish(Event("saga.order_processing.started", {"saga": "order_processing"}))
    saga.on_publish(Event("saga.order_processing.completed", {"saga": "order_processing"}))
    saga.on_publish(Event("saga.trip.compensated", {"saga": "trip"}))
    saga.on_publish(Event("saga.trip.failed", {}))  # the name from the type
    saga.on_publish(Event("saga.cmd.payment_service.failed", {}))  # a command, not a lifecycle event
    saga.on_publish(Event("saga.reply.trip", {"step": "pay", "duration": 0.25}))
    out = text(metrics)
    assert sample(out, "choreo_saga_started_total", saga="order_processing") == 1
    assert sample(out, "choreo_saga_completed_total", saga="order_processing") == 1
    assert sample(out, "choreo_saga_compensated_total", saga="trip") == 1
    assert sample(out, "choreo_saga_failed_total", saga="trip") == 1
    assert sample(out, "choreo_saga_failed_total") == 1
    assert sample(out, "choreo_saga_step_duration_seconds_count", saga="trip", step="pay") == 1
    assert sample(out, "choreo_saga_step_duration_seconds_sum", saga="trip", step="pay") == 0.25


async def test_a_real_saga_feeds_the_saga_metrics() -> None:
    from tests.apps import trip

    metrics = Metrics()
    async with run_apps(trip.app, middleware=[metrics]):
        result = await trip.coordinator.start_saga("trip", {"fixed_marker": "/none"}, timeout=5)
    assert result.state.value == "failed"
    out = text(metrics)
    assert sample(out, "choreo_saga_started_total", saga="trip") == 1
    assert sample(out, "choreo_saga_failed_total", saga="trip") == 1
    assert sample(out, "choreo_saga_step_duration_seconds_count", saga="trip", step="book_hotel") >= 1


def test_metrics_server_binds_loopback_by_default() -> None:
    metrics = Metrics()
    server = start_metrics_server(metrics.registry, 0)
    try:
        assert server._server.server_address[0] == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as response:
            assert b"choreo_events_published_total" in response.read()
    finally:
        server.close()
