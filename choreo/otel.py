"""OpenTelemetry tracing: one business transaction is one trace across services.

Needs the ``otel`` extra (``pip install 'choreo-saga[otel]'``); this is the
only module of choreo that imports ``opentelemetry``. Add
``TracingMiddleware()`` to the ``middleware`` of ``choreo.run`` /
``run_apps``, or run ``choreo worker --otel``.

What it records, following OpenTelemetry's messaging semantic conventions
(the current ones: ``messaging.operation.type`` and
``messaging.consumer.group.name``; the older ``messaging.operation`` is set
too, as backends and dashboards written for it still read it):

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

Sampling is the tracer provider's (``ParentBased(TraceIdRatioBased(r))``
keeps a share ``r`` of transactions, whole). A trace sampled out costs
little: its root publish asks the sampler once, every event of it carries
``traceparent`` with the sampled flag off, and a service handling such an
event makes its publisher's context current without starting a span
(``follow_parent``), so the handler's own spans and the events it emits
stay out of the trace too. docs/tracing.md has the measured costs.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.context import Context as TraceContext
from opentelemetry.context import attach, detach
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)
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
#: The common form of ``traceparent``: version 00, lowercase hex.
_TRACEPARENT = re.compile("00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


class TracingMiddleware(Middleware):
    """Traces what a runtime handles and publishes (see the module's docstring).

    Args:
        tracer_provider: Where spans go; ``None`` uses the global provider
            (``opentelemetry.trace.set_tracer_provider``, or what
            ``opentelemetry-instrument`` configures).
        follow_parent: An event whose ``traceparent`` has the sampled flag
            off is handled without a span of its own, its publisher's
            context current instead (what the handler emits carries the
            flag off, so services downstream follow the decision too): what
            a ``ParentBased`` sampler, the SDK's default, decides, without
            asking it. ``False`` asks the sampler for every event (needed
            only by a sampler that records children of unsampled parents).
    """

    def __init__(self, tracer_provider: trace.TracerProvider | None = None, *, follow_parent: bool = True) -> None:
        self.tracer = trace.get_tracer("choreo", tracer_provider=tracer_provider)
        self._start_span = self.tracer.start_span
        self.follow_parent = follow_parent
        self._systems: dict[str, str] = {}
        #: The attributes a route's spans share, by broker URL and group.
        self._handling: dict[tuple[str, str], dict[str, AttributeValue]] = {}

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
        if "traceparent" in headers:
            origin = _remote(headers)
            if self.follow_parent and type(origin) is _Remote and not origin.sampled:
                return _Current(origin, end=False)  # a trace sampled out upstream: nothing to record
            origin_context = origin.get_span_context()
            if self.follow_parent and origin_context.is_valid and not origin_context.trace_flags.sampled:
                return _Current(origin, end=False)  # the same, from the propagator (with a tracestate)
            parent = trace.set_span_in_context(origin, _ROOT)
        else:
            origin_context, parent = None, _ROOT
        shared = self._handling.get((broker.url, route.group))
        if shared is None:
            shared = self._handling[(broker.url, route.group)] = {
                "messaging.system": self._system(broker),
                "messaging.destination.name": route.event,
                "messaging.operation.type": "process",
                "messaging.operation.name": "handle",
                "messaging.operation": "process",
                "messaging.consumer.group.name": route.group,
            }
        # Given at the start, not after ``is_recording``: samplers may read
        # them, and the SDK sets them about 8 us cheaper than set_attributes.
        attributes = {
            **shared, "messaging.message.id": event.id, "messaging.message.conversation_id": event.correlation_id
        }
        if event.saga_id is not None:
            _saga_attributes(event, attributes)
        links = None
        if event.attempt > 1 or delivery.deliveries > 1:
            attributes["choreo.attempt"] = event.attempt
            attributes["choreo.deliveries"] = delivery.deliveries
            if origin_context is not None and origin_context.is_valid:
                redelivery = {"choreo.attempt": event.attempt, "choreo.deliveries": delivery.deliveries}
                links = [Link(origin_context, redelivery)]
        span = self._start_span(
            f"choreo.handle {event.type}", context=parent, kind=SpanKind.CONSUMER, attributes=attributes,
            links=links,
        )
        return _Current(span)

    def headers(self, event: Event) -> Mapping[str, str] | None:
        span = trace.get_current_span()
        if type(span) is _Remote:  # a trace followed unsampled: its headers pass on as they came
            return span.carrier
        span_context = span.get_span_context()
        return _carrier(span_context) if span_context.is_valid else None

    def publishing(self, broker: Broker, events: Sequence[Event]) -> contextlib.AbstractContextManager[object]:
        system = self._system(broker)
        spans = []
        # One commit is one operation: its later events (a saga start's timer
        # and lifecycle event) are children of the first one's span, so they
        # stay in its trace even when no span is current.
        batch: TraceContext | None = None
        for event in events:
            headers = event.headers
            # A caller that sets the trace context of its event chooses the parent.
            parent = trace.set_span_in_context(_remote(headers), _ROOT) if "traceparent" in headers else batch
            attributes: dict[str, AttributeValue] = {
                "messaging.system": system,
                "messaging.destination.name": event.type,
                "messaging.operation.type": "send",
                "messaging.operation.name": "publish",
                "messaging.operation": "publish",
                "messaging.message.id": event.id,
                "messaging.message.conversation_id": event.correlation_id,
            }
            if event.saga_id is not None:
                _saga_attributes(event, attributes)
            span = self._start_span(
                f"choreo.publish {event.type}", context=parent, kind=SpanKind.PRODUCER, attributes=attributes
            )
            span_context = span.get_span_context()
            if span_context.is_valid:
                headers.update(_carrier(span_context))
            spans.append(span)
            if batch is None and len(events) > 1:
                batch = trace.set_span_in_context(span)
        return _Ended(spans)

    def on_error(self, route: Route, event: Event, error: BaseException) -> None:
        span = trace.get_current_span()
        if span.is_recording():
            span.record_exception(error)

    def on_dead_letter(self, route: Route, event: Event | None, reason: str) -> None:
        if event is not None:  # else no span: undecodable deliveries are not traced
            span = trace.get_current_span()
            if span.is_recording():
                span.set_status(Status(StatusCode.ERROR, reason))

    def on_handled(self, route: Route, event: Event | None, outcome: str, duration: float) -> None:
        if event is None:
            return
        span = trace.get_current_span()
        if not span.is_recording():  # sampled out
            return
        span.set_attribute("choreo.outcome", outcome)
        if outcome == Outcome.RETRY or outcome == Outcome.FAILED:
            span.set_status(Status(StatusCode.ERROR, f"handler {outcome}"))


class _Current:
    """``tracer.start_as_current_span``'s work for a span already started:
    current while entered, an escaping exception recorded, ended on exit
    (with ``end=False``, a publisher's span made current, nothing else).
    Done by a plain object, not by the SDK's two generator-based context
    managers: it wraps every handled event (``brokers.speedups``)."""

    __slots__ = ("_end", "_span", "_token")

    def __init__(self, span: Span, end: bool = True) -> None:
        self._span = span
        self._end = end

    def __enter__(self) -> Span:
        self._token = attach(trace.set_span_in_context(self._span))
        return self._span

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        detach(self._token)
        if not self._end:
            return
        span = self._span
        try:
            if isinstance(exc, Exception) and span.is_recording():  # as use_span: not CancelledError
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        finally:
            span.end()


class _Ended:
    """Publish spans, ended when the commit is done (ERROR if it failed)."""

    __slots__ = ("_spans",)

    def __init__(self, spans: list[Span]) -> None:
        self._spans = spans

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        for span in self._spans:
            if exc is not None:
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            span.end()


class _Remote(NonRecordingSpan):
    """The span a common-form ``traceparent`` names, and the headers that
    named it. Its ``SpanContext`` is made when first asked for: an event of
    a trace sampled out and followed (``follow_parent``) may never need it,
    its headers passing on as they came."""

    def __init__(self, traceparent: str, trace_id: str, span_id: str, flags: str) -> None:
        # NonRecordingSpan.__init__ is not called: it only stores the
        # context, which get_span_context makes here on demand.
        self.carrier = {"traceparent": traceparent}
        self._parts = (trace_id, span_id, int(flags, 16))
        self.sampled = bool(self._parts[2] & TraceFlags.SAMPLED)
        self._made: SpanContext | None = None

    def get_span_context(self) -> SpanContext:
        if self._made is None:
            trace_id, span_id, flags = self._parts
            self._made = SpanContext(int(trace_id, 16), int(span_id, 16), is_remote=True, trace_flags=TraceFlags(flags))
        return self._made

    def __repr__(self) -> str:
        return f"_Remote({self.carrier['traceparent']!r})"


def _remote(headers: Mapping[str, str]) -> Span:
    """The span ``headers["traceparent"]`` names (``INVALID_SPAN`` if none):
    what ``_PROPAGATOR.extract(headers, context=_ROOT)`` makes current, with
    the common form (version 00, no ``tracestate``) read here in about a
    fifth of the time (``brokers.speedups``); anything else goes to the
    propagator."""
    traceparent = headers["traceparent"]
    match = _TRACEPARENT.fullmatch(traceparent)
    if match is not None and "tracestate" not in headers:
        trace_id, span_id, flags = match.groups()
        if trace_id != "0" * 32 and span_id != "0" * 16:
            return _Remote(traceparent, trace_id, span_id, flags)
    return trace.get_current_span(_PROPAGATOR.extract(headers, context=_ROOT))


def _carrier(span_context: SpanContext) -> dict[str, str]:
    """The W3C headers of ``span_context`` (what ``_PROPAGATOR.inject`` writes)."""
    carrier = {
        "traceparent": f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-{span_context.trace_flags:02x}"
    }
    if span_context.trace_state:
        carrier["tracestate"] = span_context.trace_state.to_header()
    return carrier


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
