"""The routing table: which handler of which service takes which event.

Routes are frozen records; ``Router.add`` is the one path that creates or
replaces them. ``on_event`` and ``emits`` are sugar over it that work in either
order and return the handler unchanged, so a handler stays a plain function.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
import typing
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import attrs

from brokers import STARTS, Start
from choreo.actions import ACTION_INTERCEPTOR, Compensation, ReplyTopics, command_topic, reply_to_command
from choreo.context import ActionContext, Context
from choreo.errors import ConfigurationError, DecodeError, error_info
from choreo.events import Event, validate_event_type
from choreo.params import INJECTABLE, Param, handler_arguments, inspect_params
from choreo.threads import run_in_daemon_thread

__all__ = ("INJECTABLE", "Emit", "Handler", "Param", "Route", "Router", "emits", "handler_arguments")

Handler = Callable[..., Any]

log = logging.getLogger("choreo.saga")

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
        start: Where its consumer group starts when it is first created
            (``brokers.Subscription.start``): ``"auto"``, ``"beginning"``
            (replay what the stream holds) or ``"end"``.
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
    start: Start = "auto"
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


class Router:
    """The routes of one service, in registration order."""

    def __init__(self, service: str) -> None:
        self.service = service
        self._routes: dict[tuple[str, str], Route] = {}
        self._compensations: list[Compensation] = []
        #: Actions by route key (name, explicit service, handler): rebuilt under an including service.
        self._actions: dict[tuple[str, str], tuple[str, str | None, Handler]] = {}

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
        if route.start not in STARTS:
            raise ConfigurationError(f"handler {route.name!r}: start must be one of {', '.join(STARTS)}")
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
        start: Start = "auto",
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
                    start=start,
                )
            )
            return handler

        return register

    def action(self, name: str, *, service: str | None = None) -> Callable[[Handler], Handler]:
        """Register the decorated function as saga participant action ``name``:
        a route on ``saga.cmd.<service>.<name>`` (default service: this
        router's) answering each command with one reply to its saga, success
        with the returned dict or failure with the error (never a dead
        letter). No retries of its own: the step's policy is the only one.

        Raises:
            ConfigurationError: a bad name, a parameter that cannot be
                injected, or the action registered twice.
        """

        def register(handler: Handler) -> Handler:
            if not callable(handler):
                raise ConfigurationError(f"@action({name!r}) must decorate a function")
            runner = _action_handler(name, service or self.service, handler, inspect_params(handler))
            route = self.add(Route(command_topic(service or self.service, name), self.service, runner.__name__,
                                   runner, emits=ReplyTopics(), retries=0, retry_delay=0.0))
            self._actions[(route.event, route.name)] = (name, service, handler)
            return handler

        return register

    def compensates(
        self,
        target: Handler | str,
        *,
        on: str | Sequence[str],
        name: str | None = None,
        retries: int = 10,
        retry_delay: float = 1.0,
    ) -> Callable[[Handler], Handler]:
        """Declare the decorated handler as the compensation of ``target`` (a
        handler here, or its name), run as an ordinary route when any ``on``
        failure event arrives; the relation is kept in ``compensations``.

        Raises:
            ConfigurationError: ``target`` is not a handler here, no trigger
                is given, a trigger is the event ``target`` itself consumes,
                or the route is invalid.
        """
        triggers = (on,) if isinstance(on, str) else tuple(on)

        def register(handler: Handler) -> Handler:
            if not triggers:
                raise ConfigurationError(f"@compensates for {handler.__name__!r} needs a trigger event in on=")
            targets = [r for r in self if (r.handler is target if callable(target) else r.name == target)]
            if not targets:
                shown = getattr(target, "__name__", target)
                raise ConfigurationError(f"@compensates: {shown!r} is not a handler of service {self.service!r}")
            consumed = {r.event for r in targets}
            for trigger in triggers:
                if trigger in consumed:
                    raise ConfigurationError(
                        f"@compensates: {trigger!r} is what {targets[0].name!r} consumes, not a failure"
                    )
            base = name or handler.__name__
            for trigger in triggers:
                # One consumer group per trigger: a route name is its group name.
                route_name = base if len(triggers) == 1 else f"{base}_on_{trigger.replace('.', '_').replace('-', '_')}"
                self.on_event(trigger, name=route_name, retries=retries, retry_delay=retry_delay)(handler)
                self._compensations.append(Compensation(self.service, targets[0].name, trigger, route_name))
            return handler

        return register

    @property
    def compensations(self) -> tuple[Compensation, ...]:
        """The compensations declared here, in declaration order."""
        return tuple(self._compensations)

    def include(self, other: Router) -> None:
        """Add every route and compensation of ``other`` to this service (a
        router as a module of handlers)."""
        for key, route in other._routes.items():
            if key in other._actions:  # its command topic names the service
                name, service, handler = other._actions[key]
                self.action(name, service=service)(handler)
            else:
                self.add(attrs.evolve(route, service=self.service))
        self._compensations += [attrs.evolve(c, service=self.service) for c in other._compensations]


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


def _action_handler(action: str, service: str, handler: Handler, params: Sequence[Param]) -> Handler:
    """The route handler running ``handler`` for a saga command: whatever happens is one reply."""
    is_async = inspect.iscoroutinefunction(handler)
    wants_ctx = any(param.source == "ctx" for param in params)  # else no action context to build

    async def run_action(event: Event, ctx: Context) -> Emit:
        reply_to, reply = reply_to_command(event, action)
        started = time.perf_counter()
        try:
            interceptor = ctx.extensions.get(ACTION_INTERCEPTOR)
            if interceptor is not None:
                interceptor(service, action, dict(event.data))
            action_ctx = ActionContext.of(ctx, reply["attempt"]) if wants_ctx else ctx
            kwargs = handler_arguments(params, event, action_ctx, event.data)
            result = await handler(**kwargs) if is_async else await run_in_daemon_thread(handler, **kwargs)
            if inspect.isawaitable(result):
                result = await result
            if result is None:
                result = {}
            if not isinstance(result, dict):
                raise TypeError(f"action {action!r} returned {type(result).__name__}; return a dict or None")
            reply.update(outcome="succeeded", result=result, error=None)
        except Exception as exc:  # any failure is a failure reply, never a dead letter
            log.warning("[SAGA-%s] action %s.%s failed (attempt %s): %s: %s",
                        event.saga_id, service, action, reply["attempt"], type(exc).__name__, exc)
            reply.update(outcome="failed", result={}, error=error_info(exc))
        reply["duration"] = time.perf_counter() - started
        return Emit(reply_to, reply, merge=False)

    run_action.__qualname__ = run_action.__name__ = f"action_{action}"
    return run_action


def declared_emits(handler: Handler) -> Sequence[str]:
    """The events ``handler`` declares with ``@emits`` (empty if terminal)."""
    return typing.cast(Sequence[str], getattr(handler, _EMITS_ATTR, ()))
