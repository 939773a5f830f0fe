"""OpenTelemetry tracing, on both brokers: one business transaction across
services is one trace, spans carry the messaging semantic attributes and the
saga's, failures are errors, redeliveries link to their origin, and the W3C
trace context travels in event headers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, StatusCode, TraceFlags, TraceState

from choreo import App, Context, Emit, SagaCoordinator, SagaState, SagaStep, otel
from choreo.middleware import Hooks, Middleware
from choreo.otel import TracingMiddleware
from choreo.postgres import PostgresStateStore
from choreo.testing import run_apps


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    instance = InMemorySpanExporter()
    yield instance
    instance.clear()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> TracerProvider:
    """A provider of the test's own (the global one is left alone)."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def system_of(broker_url: str) -> str:
    return "memory" if broker_url.startswith("memory") else "redis"


def by_name(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [span for span in spans if span.name == name]


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def traceparent(span: ReadableSpan) -> str:
    """The W3C header naming ``span`` as the parent."""
    context = span.context
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def three_services(provider: TracerProvider) -> list[App]:
    """orders -> payments (sync, with a span of its own) -> shipping."""
    orders, payments, shipping = App("orders"), App("payments"), App("shipping")

    @orders.on_event("order.placed")
    @orders.emits("order.accepted")
    async def accept(data: dict[str, Any]) -> None:
        return None

    @payments.on_event("order.accepted")
    @payments.emits("payment.taken")
    def charge(data: dict[str, Any]) -> dict[str, Any]:
        # A sync handler runs in a thread that sees the handling span.
        with provider.get_tracer("bank").start_as_current_span("bank.charge"):
            return {"paid": True}

    @shipping.on_event("payment.taken")
    async def ship(data: dict[str, Any]) -> None:
        return None

    return [orders, payments, shipping]


async def test_one_transaction_across_three_apps_is_one_trace(
    broker_url: str, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """publish -> orders -> payments -> shipping: one trace, each span the
    child of the span that published its event, with the messaging attributes."""
    async with run_apps(*three_services(provider), broker=broker_url, middleware=[TracingMiddleware(provider)]) as env:
        placed = await env.publish("order.placed", {"order_id": "O-1"})
        await env.settle()
    spans = exporter.get_finished_spans()
    [publish] = by_name(spans, "choreo.publish order.placed")
    [placed_span] = by_name(spans, "choreo.handle order.placed")
    [accepted] = by_name(spans, "choreo.handle order.accepted")
    [bank] = by_name(spans, "bank.charge")
    [taken] = by_name(spans, "choreo.handle payment.taken")
    assert len({span.context.trace_id for span in spans}) == 1
    assert publish.parent is None and publish.kind is SpanKind.PRODUCER
    assert parent_id(placed_span) == publish.context.span_id
    assert parent_id(accepted) == placed_span.context.span_id
    assert parent_id(bank) == accepted.context.span_id
    assert parent_id(taken) == accepted.context.span_id
    assert {span.kind for span in (placed_span, accepted, taken)} == {SpanKind.CONSUMER}
    assert publish.attributes is not None and placed_span.attributes is not None
    assert dict(publish.attributes) == {
        "messaging.system": system_of(broker_url),
        "messaging.destination.name": "order.placed",
        "messaging.operation.type": "send",
        "messaging.operation.name": "publish",
        "messaging.operation": "publish",
        "messaging.message.id": placed.id,
        "messaging.message.conversation_id": placed.id,
    }
    assert dict(placed_span.attributes) == {
        "messaging.system": system_of(broker_url),
        "messaging.destination.name": "order.placed",
        "messaging.operation.type": "process",
        "messaging.operation.name": "handle",
        "messaging.operation": "process",
        "messaging.message.id": placed.id,
        "messaging.message.conversation_id": placed.id,
        "messaging.consumer.group.name": "orders.accept",
        "choreo.outcome": "success",
    }
    assert all(span.status.status_code is StatusCode.UNSET for span in spans)


async def test_trace_context_travels_in_event_headers_on_the_wire(
    broker_url: str, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """Each stored event's ``traceparent`` names the span that published it,
    and a caller's ``tracestate`` travels with it."""
    async with run_apps(*three_services(provider), broker=broker_url, middleware=[TracingMiddleware(provider)]) as env:
        with provider.get_tracer("caller").start_as_current_span("checkout") as checkout:
            await env.publish("order.placed", {"order_id": "O-1"})
        await env.settle()
        entries = await env.broker.history()
    spans = exporter.get_finished_spans()
    on_wire = {}
    for entry in entries:
        event = json.loads(entry.body)
        on_wire[event["type"]] = event["headers"]["traceparent"]
    [publish] = by_name(spans, "choreo.publish order.placed")
    [accepted] = by_name(spans, "choreo.handle order.accepted")
    trace_id = checkout.get_span_context().trace_id
    assert publish.context.trace_id == trace_id and parent_id(publish) == checkout.get_span_context().span_id
    assert on_wire["order.placed"] == traceparent(publish)
    assert on_wire["order.accepted"] == traceparent(by_name(spans, "choreo.handle order.placed")[0])
    assert on_wire["payment.taken"] == traceparent(accepted)


async def test_a_callers_traceparent_header_is_the_parent_of_its_publish(
    broker_url: str, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """A root event published with a ``traceparent`` (from another system) joins that trace."""
    trace_id, span_id = 0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7
    headers = {"traceparent": f"00-{trace_id:032x}-{span_id:016x}-01", "tracestate": "vendor=1"}
    async with run_apps(*three_services(provider), broker=broker_url, middleware=[TracingMiddleware(provider)]) as env:
        event = await env.publish("order.placed", {}, headers=headers)
        await env.settle()
    [publish] = by_name(exporter.get_finished_spans(), "choreo.publish order.placed")
    assert publish.context.trace_id == trace_id and parent_id(publish) == span_id
    assert event.headers["tracestate"] == "vendor=1"
    assert headers == {"traceparent": f"00-{trace_id:032x}-{span_id:016x}-01", "tracestate": "vendor=1"}
    assert {span.context.trace_id for span in exporter.get_finished_spans()} == {trace_id}


class Alternating(RandomIdGenerator):
    """Trace ids that ``TraceIdRatioBased(0.5)`` samples and drops in turn
    (it compares their low 64 bits with half of 2**64)."""

    def __init__(self) -> None:
        self.ids = iter([(1 << 100) | 1, (2 << 100) | (2**64 - 1)] * 100)

    def generate_trace_id(self) -> int:
        return next(self.ids)


@pytest.mark.parametrize("follow_parent", [True, False])
async def test_with_a_ratio_sampler_a_trace_is_recorded_whole_or_not_at_all(
    broker_url: str, exporter: InMemorySpanExporter, follow_parent: bool
) -> None:
    """A root sampled out makes no span anywhere downstream (its handlers,
    and a span a handler starts, follow the flag in ``traceparent``) while
    its events flow as usual; a sampled root is one whole trace. Whether
    the middleware follows the flag itself or asks the sampler."""
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.5)), id_generator=Alternating())
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    middleware = [TracingMiddleware(provider, follow_parent=follow_parent)]
    async with run_apps(*three_services(provider), broker=broker_url, middleware=middleware) as env:
        await env.publish("order.placed", {"order_id": "O-1"})  # sampled
        await env.publish("order.placed", {"order_id": "O-2"})  # not sampled
        await env.settle()
        entries = await env.broker.history()
    assert len(env.published("payment.taken")) == 2
    spans = exporter.get_finished_spans()
    assert {span.context.trace_id for span in spans} == {(1 << 100) | 1}
    assert sorted(span.name for span in spans) == [
        "bank.charge", "choreo.handle order.accepted", "choreo.handle order.placed", "choreo.handle payment.taken",
        "choreo.publish order.placed",
    ]
    on_wire: dict[str, list[str]] = {}
    for entry in entries:
        event = json.loads(entry.body)
        on_wire.setdefault(event["headers"]["traceparent"][3:35], []).append(event["headers"]["traceparent"])
    unsampled = on_wire[f"{(2 << 100) | (2**64 - 1):032x}"]
    assert len(unsampled) == 3 and not any(int(header[53:], 16) & TraceFlags.SAMPLED for header in unsampled)
    assert all(int(header[53:], 16) & TraceFlags.SAMPLED for header in on_wire[f"{(1 << 100) | 1:032x}"])


async def test_a_failing_handler_is_an_error_and_its_retry_links_to_the_origin(
    broker_url: str, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """Each failed attempt is an ERROR span with the exception; the retry is
    a child of the publisher too, and links to it."""
    app = App("flaky")

    @app.on_event("job.submitted", retries=1, retry_delay=0.0)
    async def work(data: dict[str, Any]) -> None:
        raise RuntimeError("disk full")

    async with run_apps(app, broker=broker_url, middleware=[TracingMiddleware(provider)]) as env:
        await env.publish("job.submitted", {})
        await env.settle()
    spans = exporter.get_finished_spans()
    [publish] = by_name(spans, "choreo.publish job.submitted")
    first, second = sorted(by_name(spans, "choreo.handle job.submitted"), key=lambda span: span.start_time or 0)
    for span, outcome in ((first, "retry"), (second, "dead_lettered")):
        assert span.status.status_code is StatusCode.ERROR
        assert span.attributes is not None and span.attributes["choreo.outcome"] == outcome
        assert parent_id(span) == publish.context.span_id
        [exception] = [e for e in span.events if e.name == "exception"]
        assert exception.attributes is not None and exception.attributes["exception.message"] == "disk full"
    assert "failed after 2 attempts" in (second.status.description or "")
    assert first.links == ()
    [link] = second.links
    assert link.context.span_id == publish.context.span_id
    assert second.attributes is not None and second.attributes["choreo.attempt"] == 2


@pytest.mark.parametrize("state", ["broker", "postgres"])
async def test_saga_commands_and_replies_carry_the_saga(
    broker_url: str, provider: TracerProvider, exporter: InMemorySpanExporter, state: str,
    request: pytest.FixtureRequest,
) -> None:
    """A saga's start, commands and replies are one trace, and the command
    and reply spans name the saga, its id and the step; with PostgreSQL state
    too, whose commands reach the broker through the outbox relay."""
    orders, payments = App("orders"), App("payments")
    store = PostgresStateStore(request.getfixturevalue("database_url")) if state == "postgres" else None
    coordinator = SagaCoordinator(orders, state_store=store)
    coordinator.define_saga(
        "checkout",
        [
            SagaStep("reserve", "orders", "reserve", None, timeout=5.0, retry_count=0),
            SagaStep("charge", "payments", "charge", None, timeout=5.0, retry_count=0),
        ],
    )

    @orders.action("reserve")
    async def reserve(ctx: Context) -> dict[str, Any]:
        return {"reserved": True}

    @payments.action("charge")
    async def charge(ctx: Context) -> dict[str, Any]:
        return {"charged": True}

    async with run_apps(orders, payments, broker=broker_url, middleware=[TracingMiddleware(provider)]):
        result = await coordinator.start_saga("checkout", {"order_id": "O-1"}, saga_id="S-1", timeout=10)
    assert result.state is SagaState.COMPLETED
    spans = exporter.get_finished_spans()
    assert len({span.context.trace_id for span in spans}) == 1
    for topic, step in (("saga.cmd.orders.reserve", "reserve"), ("saga.cmd.payments.charge", "charge")):
        [command] = by_name(spans, f"choreo.handle {topic}")
        assert command.attributes is not None
        assert (command.attributes["saga.id"], command.attributes["saga.name"], command.attributes["saga.step"]) == (
            "S-1", "checkout", step,
        )
    replies = by_name(spans, "choreo.handle saga.reply.checkout")
    assert len(replies) == 2
    assert sorted(str((span.attributes or {})["saga.step"]) for span in replies) == ["charge", "reserve"]
    assert all((span.attributes or {})["saga.name"] == "checkout" for span in replies)
    [start] = by_name(spans, "choreo.publish saga.cmd.orders.reserve")
    assert start.attributes is not None and start.attributes["saga.step"] == "reserve"


async def test_handler_emits_and_publishes_carry_the_handling_span(
    broker_url: str, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """Events a handler returns, and root events it publishes, are children of its span."""
    app = App("fanout")

    @app.on_event("batch.received")
    @app.emits("item.split")
    async def split(data: dict[str, Any]) -> list[Emit]:
        await app.publish("audit.logged", {})
        return [Emit("item.split", {"n": 1}), Emit("item.split", {"n": 2})]

    @app.on_event("item.split")
    async def item(data: dict[str, Any]) -> None:
        return None

    async with run_apps(app, broker=broker_url, middleware=[TracingMiddleware(provider)]) as env:
        await env.publish("batch.received", {})
        await env.settle()
    spans = exporter.get_finished_spans()
    [handling] = by_name(spans, "choreo.handle batch.received")
    [audit] = by_name(spans, "choreo.publish audit.logged")
    items = by_name(spans, "choreo.handle item.split")
    assert len(items) == 2
    assert {parent_id(span) for span in (*items, audit)} == {handling.context.span_id}


def test_middleware_without_the_optional_hooks_binds_none() -> None:
    """A runtime whose middleware does not override handling, publishing,
    headers or on_error does no work for them per event."""
    hooks = Hooks([Middleware()])
    assert (hooks.handling, hooks.publishing, hooks.headers, hooks.errors) == ((), (), (), ())
    traced = Hooks([Middleware(), TracingMiddleware(TracerProvider())])
    assert len(traced.handling) == len(traced.publishing) == len(traced.headers) == len(traced.errors) == 1


_WITHOUT_OTEL = """
import sys
sys.modules["opentelemetry"] = None  # as if the otel extra were not installed
import asyncio
from choreo import App
from choreo.testing import run_apps

app = App("plain")
seen = []

@app.on_event("ping")
async def pong(data):
    seen.append(data)

async def main():
    async with run_apps(app) as env:
        await env.publish("ping", {"n": 1})
        await env.settle()
    assert seen == [{"n": 1}], seen
    assert not any(name.startswith("opentelemetry") and sys.modules[name] for name in sys.modules)

asyncio.run(main())
if sys.argv[1:]:
    from choreo.cli import main
    sys.argv = ["choreo", "worker", "tests.apps.pingpong:app", "--otel"]
    main()
"""


def test_choreo_runs_without_opentelemetry_and_worker_otel_says_what_is_missing() -> None:
    """Only ``choreo.otel`` needs the extra; ``--otel`` without it is a one-line error."""
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    plain = subprocess.run([sys.executable, "-c", _WITHOUT_OTEL], capture_output=True, text=True, env=env)
    assert plain.returncode == 0, plain.stderr
    cli = subprocess.run([sys.executable, "-c", _WITHOUT_OTEL, "cli"], capture_output=True, text=True, env=env)
    assert cli.returncode == 2
    assert cli.stderr.strip().splitlines() == ["error: --otel needs OpenTelemetry: pip install 'choreo-saga[otel]'"]


_HEXES = st.text("0123456789abcdef", min_size=1, max_size=34)
_PARTS = st.one_of(_HEXES, st.sampled_from(["0" * 32, "0" * 16, "ff", "00", "01", "0g", "AB" * 8, "-1" * 8]))


@given(st.one_of(
    st.builds(lambda *parts: "-".join(parts), _PARTS, _PARTS, _PARTS, _PARTS),
    st.builds(lambda t, s, f: f"00-{t:032x}-{s:016x}-{f:02x}", st.integers(0, 2**128 - 1),
              st.integers(0, 2**64 - 1), st.integers(0, 255)),
    st.text(max_size=70),
), st.booleans())
@settings(max_examples=400)
def test_a_traceparent_is_read_as_the_w3c_propagator_reads_it(header: str, with_state: bool) -> None:
    """The middleware reads the common traceparent form itself (it is on
    every traced delivery): whatever the header, the parent it finds is the
    one OpenTelemetry's own propagator finds."""
    headers = {"traceparent": header}
    if with_state:
        headers["tracestate"] = "vendor=value"
    ours = otel._remote(headers).get_span_context()
    theirs = trace.get_current_span(otel._PROPAGATOR.extract(headers, context=otel._ROOT)).get_span_context()
    assert ours == theirs
    assert (ours.trace_state, ours.is_remote) == (theirs.trace_state, theirs.is_remote)


@given(st.integers(1, 2**128 - 1), st.integers(1, 2**64 - 1), st.integers(0, 255), st.booleans())
def test_the_headers_written_are_the_w3c_propagators(trace_id: int, span_id: int, flags: int, with_state: bool) -> None:
    state = TraceState([("vendor", "value")]) if with_state else None
    span_context = SpanContext(trace_id, span_id, is_remote=False, trace_flags=TraceFlags(flags), trace_state=state)
    theirs: dict[str, str] = {}
    otel._PROPAGATOR.inject(theirs, context=trace.set_span_in_context(NonRecordingSpan(span_context)))
    assert otel._carrier(span_context) == theirs
