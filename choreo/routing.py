"""The routing table: which handler of which service takes which event.

Routes are frozen records; ``Router.add`` is the one path that creates or
replaces them. ``on_event`` and ``emits`` are sugar over it that work in either
order and return the handler unchanged, so a handler stays a plain function.
"""

from __future__ import annotations

import contextlib
import inspect
import typing
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from choreo.errors import ConfigurationError, DecodeError
from choreo.events import Event, validate_event_type
from choreo.payloads import build_payload

if TYPE_CHECKING:
    from choreo.context import Context

__all__ = ("INJECTABLE", "Emit", "Handler", "Param", "Route", "Router", "emits", "handler_arguments")

Handler = Callable[..., Any]

#: Parameter names a handler can ask for, and what it receives.
INJECTABLE = ("data", "event", "ctx", "saga_id", "correlation_id")

_EMITS_ATTR = "__choreo_emits__"
_ROUTERS_ATTR = "__choreo_routers__"


@attrs.frozen
class Emit:
    """An explicit choice of emitted event, returned by a handler.

    Attributes:
        type: One of the handler's declared events.
        data: Merged over the incoming data (``{**incoming, **data}``) unless
            ``merge`` is false.
        delay: Seconds until it becomes deliverable.
        headers: String metadata for the emitted event (e.g. ``idempotency_key``).
    """

    type: str
    data: dict[str, Any] | None = None
    delay: float | None = None
    merge: bool = True
    headers: dict[str, str] | None = None


@attrs.frozen
class Param:
    """How one handler parameter is filled: an injectable name or an attrs class."""

    name: str
    source: str  # one of INJECTABLE, or "model"
    model: type[Any] | None = None


@attrs.frozen
class Route:
    """One handler subscribed to one event type.

    Attributes:
        event: The event type it consumes.
        service: The app (service) it belongs to.
        name: The handler's name, unique per service and event.
        handler: The function, unchanged.
        emits: Declared outputs: the first on success, the second on failure.
        group: Its consumer group, ``service.name``.
        retries: Retries after the first attempt.
        retry_delay: Base of the exponential backoff, seconds.
        timeout: Seconds per attempt, or ``None``.
        concurrency: Most attempts running at once in one worker, or ``None``.
        params: How its parameters are injected.
    """

    event: str
    service: str
    name: str
    handler: Handler = attrs.field(eq=False)
    emits: tuple[str, ...] = ()
    retries: int = 3
    retry_delay: float = 1.0
    timeout: float | None = None
    concurrency: int | None = None
    params: tuple[Param, ...] = attrs.field(default=(), eq=False, repr=False)

    @property
    def group(self) -> str:
        return f"{self.service}.{self.name}"

    @property
    def terminal(self) -> bool:
        return not self.emits

    @property
    def failure_event(self) -> str | None:
        return self.emits[1] if len(self.emits) > 1 else None


def _check_type(event_type: str, what: str) -> str:
    try:
        return validate_event_type(event_type)
    except DecodeError as exc:
        raise ConfigurationError(f"{what}: {exc}") from None


def inspect_params(handler: Handler) -> tuple[Param, ...]:
    """Work out how to call ``handler``.

    A parameter annotated with an attrs class (other than ``Event``) receives
    that class built from the payload, whatever its name (``data`` included:
    the annotation wins); any other parameter is injected by its name.

    Raises:
        ConfigurationError: a parameter is neither injectable by name nor
            annotated with an attrs class.
    """
    hints = _annotations(handler)
    params = []
    for parameter in inspect.signature(handler).parameters.values():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            raise ConfigurationError(f"handler {handler.__qualname__}: *args/**kwargs cannot be injected")
        annotation = hints.get(parameter.name)
        if isinstance(annotation, type) and attrs.has(annotation) and annotation is not Event:
            params.append(Param(parameter.name, "model", annotation))
        elif parameter.name in INJECTABLE:
            params.append(Param(parameter.name, parameter.name))
        else:
            raise ConfigurationError(
                f"handler {handler.__qualname__}: cannot inject parameter {parameter.name!r}; "
                f"use one of {', '.join(INJECTABLE)} or annotate it with an attrs class"
            )
    return tuple(params)


def _annotations(handler: Handler) -> dict[str, Any]:
    """The handler's annotations, resolved where possible.

    ``typing.get_type_hints`` gives up on all of them if one does not resolve
    (``ctx: Context`` imported only under ``TYPE_CHECKING``); then each string
    annotation is resolved on its own, so ``order: Order`` beside it still
    names the class.
    """
    try:
        return typing.get_type_hints(handler)
    except Exception:
        pass
    raw = dict(getattr(handler, "__annotations__", None) or {})
    namespace = getattr(inspect.unwrap(handler), "__globals__", {})
    for name, annotation in raw.items():
        # Twice for a quoted annotation under ``from __future__ import annotations``.
        for _ in range(2):
            if isinstance(annotation, str):
                with contextlib.suppress(Exception):
                    annotation = eval(annotation, namespace)  # what get_type_hints does, one name at a time
        raw[name] = annotation
    return raw


def handler_arguments(params: Sequence[Param], event: Event, ctx: Context, data: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments that call a handler with ``params`` for ``event``.

    ``data`` is the payload the handler sees (the event's data, or a part of it).

    Raises:
        PayloadValidationError: an attrs-typed parameter does not fit ``data``.
    """
    kwargs: dict[str, Any] = {}
    for param in params:
        source = param.source
        if source == "data":
            kwargs[param.name] = dict(data)
        elif source == "event":
            kwargs[param.name] = event
        elif source == "ctx":
            kwargs[param.name] = ctx
        elif source == "saga_id":
            kwargs[param.name] = event.saga_id
        elif source == "correlation_id":
            kwargs[param.name] = event.correlation_id
        else:
            assert param.model is not None
            kwargs[param.name] = build_payload(param.model, data)
    return kwargs


class Router:
    """The routes of one service, in registration order."""

    def __init__(self, service: str) -> None:
        self.service = service
        self._routes: dict[tuple[str, str], Route] = {}

    def __iter__(self) -> Iterator[Route]:
        return iter(self._routes.values())

    def __len__(self) -> int:
        return len(self._routes)

    @property
    def routes(self) -> tuple[Route, ...]:
        return tuple(self._routes.values())

    def add(self, route: Route, *, replace: bool = False) -> Route:
        """Validate and store a route; the one way routes enter the table.

        Raises:
            ConfigurationError: invalid names or options, or a duplicate
                (same event and handler name) unless ``replace``.
        """
        _check_type(route.event, f"handler {route.name!r}")
        for emitted in route.emits:
            _check_type(emitted, f"handler {route.name!r} emits")
        if len(set(route.emits)) != len(route.emits):
            raise ConfigurationError(f"handler {route.name!r} declares an emitted event twice: {route.emits}")
        if not route.name.replace("_", "a").replace("-", "a").isalnum():
            raise ConfigurationError(f"handler name {route.name!r} must be letters, digits, '_' or '-'")
        if route.retries < 0:
            raise ConfigurationError(f"handler {route.name!r}: retries must be >= 0")
        if route.retry_delay < 0:
            raise ConfigurationError(f"handler {route.name!r}: retry_delay must be >= 0")
        if route.timeout is not None and route.timeout <= 0:
            raise ConfigurationError(f"handler {route.name!r}: timeout must be positive")
        if route.concurrency is not None and route.concurrency < 1:
            raise ConfigurationError(f"handler {route.name!r}: concurrency must be >= 1")
        key = (route.event, route.name)
        if key in self._routes and not replace:
            raise ConfigurationError(
                f"service {self.service!r} already has a handler named {route.name!r} for {route.event!r}"
            )
        if not route.params:
            route = attrs.evolve(route, params=inspect_params(route.handler))
        self._routes[key] = route
        # Remembered on the function so that an @emits applied later can complete the route.
        registrations = getattr(route.handler, _ROUTERS_ATTR, None)
        if registrations is None:
            registrations = []
            # Bound methods and builtins take no attributes; they cannot use @emits afterwards.
            with contextlib.suppress(AttributeError):
                setattr(route.handler, _ROUTERS_ATTR, registrations)
        if (self, key) not in registrations:
            registrations.append((self, key))
        return route

    def on_event(
        self,
        event: str,
        *,
        name: str | None = None,
        retries: int = 3,
        retry_delay: float = 1.0,
        timeout: float | None = None,
        concurrency: int | None = None,
    ) -> Callable[[Handler], Handler]:
        """Subscribe the decorated function to ``event`` (see ``App.on_event``)."""

        def register(handler: Handler) -> Handler:
            if not callable(handler):
                raise ConfigurationError(f"@on_event({event!r}) must decorate a function")
            self.add(
                Route(
                    event=event,
                    service=self.service,
                    name=name or handler.__name__,
                    handler=handler,
                    emits=getattr(handler, _EMITS_ATTR, ()),
                    retries=retries,
                    retry_delay=retry_delay,
                    timeout=timeout,
                    concurrency=concurrency,
                )
            )
            return handler

        return register

    def include(self, other: Router) -> None:
        """Add every route of ``other`` to this service (a router as a module of handlers)."""
        for route in other:
            self.add(attrs.evolve(route, service=self.service))


def emits(success: str, *others: str) -> Callable[[Handler], Handler]:
    """Declare the events a handler emits: ``success`` first, then the others
    (the second is the failure event). Works above or below ``@on_event``."""
    declared = (success, *others)
    for event_type in declared:
        _check_type(event_type, "@emits")

    def declare(handler: Handler) -> Handler:
        setattr(handler, _EMITS_ATTR, declared)
        # If @on_event came first, complete the routes it registered.
        for router, key in getattr(handler, _ROUTERS_ATTR, ()):
            route = router._routes.get(key)
            if route is not None and route.handler is handler:
                router.add(attrs.evolve(route, emits=declared), replace=True)
        return handler

    return declare


def declared_emits(handler: Handler) -> Sequence[str]:
    """The events ``handler`` declares with ``@emits`` (empty if terminal)."""
    return typing.cast(Sequence[str], getattr(handler, _EMITS_ATTR, ()))
