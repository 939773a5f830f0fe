"""OpenTelemetry tracing: one business transaction is one trace across services.

Needs the ``otel`` extra (``pip install 'choreo-saga[otel]'``); this is the
only module of choreo that imports ``opentelemetry``. Add
``TracingMiddleware()`` to the ``middleware`` of ``choreo.run`` /
``run_apps``, or run ``choreo worker --otel``.

What it records, following OpenTelemetry's messaging semantic conventions
(the current ones: ``messaging.operation.type`` and
``messaging.consumer.group.name``, not the older ``messaging.operation``):

* ``choreo.handle <event type>`` (kind CONSUMER, operation type ``process``)
  for each handled event, current while the handler runs, so what the
  handler emits, publishes or starts carries its W3C ``traceparent`` (and
  ``tracestate``) in the event's headers. Its parent is the context the event
  carries: the span that published it.
* ``choreo.publish <event type>`` (kind PRODUCER, operation type ``send``)
  for each root publish (``publish``, a saga's start), child of whatever span
  is current; an event a handler emits carries the handler's span instead,
  without a span of its own.
* A redelivered event (a retry, ``attempt > 1``, or a delivery handed out
  again after a lost lease) is still a child of its publisher, so every
  attempt sits in the transaction's trace, and also links to that context:
  the conventions make the link to a message's creation context the
  relation a consumer must record and the parent optional, and choreo adds
  the link where it tells something, on attempts after the first.
* Status ERROR, with the exception recorded, when the handler fails (the
  outcome ``retry``, ``failed`` or ``dead_lettered`` is in
  ``choreo.outcome``).

Saga commands and replies also carry ``saga.id``, ``saga.name`` and
``saga.step``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.context import Context as TraceContext
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from choreo.actions import REPLY_PREFIX
from choreo.middleware import Middleware, Outcome

if TYPE_CHECKING:
    from brokers import Broker, Delivery
    from choreo.events import Event
    from choreo.routing import Route

__all__ = ("TracingMiddleware",)

#: W3C trace context whatever propagators are configured globally: the
#: headers are choreo's wire format, the same for every service.
_PROPAGATOR = TraceContextTextMapPropagator()
#: Events without a ``traceparent`` start a trace of their own, not one
#: under whatever span was current when the runtime started.
_ROOT = TraceContext()


class TracingMiddleware(Middleware):
    """Traces what a runtime handles and publishes (see the module's docstring).

    Args:
        tracer_provider: Where spans go; ``None`` uses the global provider
            (``opentelemetry.trace.set_tracer_provider``, or what
            ``opentelemetry-instrument`` configures).
    """

    def __init__(self, tracer_provider: trace.TracerProvider | None = None) -> None:
        self.tracer = trace.get_tracer("choreo", tracer_provider=tracer_provider)
        self._systems: dict[str, str] = {}

    def _system(self, broker: Broker) -> str:
        """``messaging.system``: the broker URL's scheme ("redis", "memory")."""
        url = broker.url
        system = self._systems.get(url)
        if system is None:
            scheme = url.partition(":")[0]
            system = self._systems[url] = "redis" if scheme.startswith("redis") else scheme
        return system

    def handling(
        self, broker: Broker, route: Route, delivery: Delivery, event: Event
    ) -> contextlib.AbstractContextManager[object]:
        headers = event.headers
        parent = _PROPAGATOR.extract(headers, context=_ROOT) if "traceparent" in headers else _ROOT
        attributes: dict[str, AttributeValue] = {
            "messaging.system": self._system(broker),
            "messaging.destination.name": event.type,
            "messaging.operation.type": "process",
            "messaging.operation.name": "handle",
            "messaging.message.id": event.id,
            "messaging.message.conversation_id": event.correlation_id,
            "messaging.consumer.group.name": route.group,
        }
        if event.saga_id is not None:
            _saga_attributes(event, attributes)
        links = None
        if event.attempt > 1 or delivery.deliveries > 1:
            attributes["choreo.attempt"] = event.attempt
            attributes["choreo.deliveries"] = delivery.deliveries
            origin = trace.get_current_span(parent).get_span_context()
            if origin.is_valid:
                links = [Link(origin, {"choreo.attempt": event.attempt, "choreo.deliveries": delivery.deliveries})]
        return self.tracer.start_as_current_span(
            f"choreo.handle {event.type}", context=parent, kind=SpanKind.CONSUMER, attributes=attributes,
            links=links,
        )

    def headers(self, event: Event) -> Mapping[str, str] | None:
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier)
        return carrier

    def publishing(self, broker: Broker, events: Sequence[Event]) -> contextlib.AbstractContextManager[object]:
        return self._publishing(self._system(broker), events)

    @contextlib.contextmanager
    def _publishing(self, system: str, events: Sequence[Event]) -> Iterator[None]:
        spans = []
        # One commit is one operation: its later events (a saga start's timer
        # and lifecycle event) are children of the first one's span, so they
        # stay in its trace even when no span is current.
        batch: TraceContext | None = None
        for event in events:
            headers = event.headers
            # A caller that sets the trace context of its event chooses the parent.
            parent = _PROPAGATOR.extract(headers, context=_ROOT) if "traceparent" in headers else batch
            attributes: dict[str, AttributeValue] = {
                "messaging.system": system,
                "messaging.destination.name": event.type,
                "messaging.operation.type": "send",
                "messaging.operation.name": "publish",
                "messaging.message.id": event.id,
                "messaging.message.conversation_id": event.correlation_id,
            }
            if event.saga_id is not None:
                _saga_attributes(event, attributes)
            span = self.tracer.start_span(
                f"choreo.publish {event.type}", context=parent, kind=SpanKind.PRODUCER, attributes=attributes
            )
            context = trace.set_span_in_context(span)
            _PROPAGATOR.inject(headers, context=context)
            spans.append(span)
            if batch is None:
                batch = context
        try:
            yield
        except BaseException as exc:
            for span in spans:
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            raise
        finally:
            for span in spans:
                span.end()

    def on_error(self, route: Route, event: Event, error: BaseException) -> None:
        trace.get_current_span().record_exception(error)

    def on_dead_letter(self, route: Route, event: Event | None, reason: str) -> None:
        if event is not None:  # else no span: undecodable deliveries are not traced
            trace.get_current_span().set_status(Status(StatusCode.ERROR, reason))

    def on_handled(self, route: Route, event: Event | None, outcome: str, duration: float) -> None:
        if event is None:
            return
        span = trace.get_current_span()
        span.set_attribute("choreo.outcome", outcome)
        if outcome == Outcome.RETRY or outcome == Outcome.FAILED:
            span.set_status(Status(StatusCode.ERROR, f"handler {outcome}"))


def _saga_attributes(event: Event, attributes: dict[str, AttributeValue]) -> None:
    """``saga.*`` of an event with a saga id: a command names its saga and
    step in headers, a reply in its data (``choreo.actions``)."""
    if event.saga_id is not None:
        attributes["saga.id"] = event.saga_id
    fields: Mapping[str, Any] = event.headers
    name, step = fields.get("saga"), fields.get("saga_step")
    if event.type.startswith(REPLY_PREFIX):
        fields = event.data
        name, step = fields.get("saga"), fields.get("step")
    if isinstance(name, str):
        attributes["saga.name"] = name
    if isinstance(step, str):
        attributes["saga.step"] = step
