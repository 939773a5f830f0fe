"""Middleware: observers of what a runtime publishes and handles.

Metrics, test recorders and tracing are middleware. Hooks are synchronous and
must be cheap: they run on the per-event path. ``Hooks`` is the one loop that
calls them, shared by the runtime's outbox and its dispatcher.

Three hooks let a middleware carry context along with events, as tracing
does: ``handling`` wraps the handling of one delivery (what the handler
emits, publishes or starts happens inside it), ``publishing`` wraps one root
commit, and ``headers`` adds headers to an event a handler emits. They are
optional: ``Hooks`` binds only those a middleware overrides, and a runtime
whose middleware overrides none of them does no work for them per event.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from brokers import Broker, Delivery
    from choreo.events import Event
    from choreo.routing import Route

__all__ = ("Entered", "Hooks", "Middleware", "Outcome")

log = logging.getLogger("choreo.middleware")


class Outcome:
    """How handling one delivery ended (the ``outcome`` metric label)."""

    SUCCESS = "success"
    RETRY = "retry"
    FAILED = "failed"  # retries spent, the failure event was emitted
    DEAD_LETTERED = "dead_lettered"


class Middleware:
    """Base class: override the hooks you need; each default does nothing."""

    def on_publish(self, event: Event) -> None:
        """An event was committed to the broker (a root publish or a handler's emit)."""

    def on_handled(self, route: Route, event: Event | None, outcome: str, duration: float) -> None:
        """A handler attempt was settled; ``event`` is ``None`` if it could not be decoded."""

    def on_dead_letter(self, route: Route, event: Event | None, reason: str) -> None:
        """A delivery was dead-lettered by its handler's group."""

    def on_error(self, route: Route, event: Event, error: BaseException) -> None:
        """The handler of ``route`` failed on ``event`` with ``error`` (an
        exception, a ``Retry`` or a ``Reject``); ``on_handled`` follows with
        the outcome once the delivery is settled."""

    def handling(
        self, broker: Broker, route: Route, delivery: Delivery, event: Event
    ) -> contextlib.AbstractContextManager[object] | None:
        """A context manager to enter while ``event`` (decoded from
        ``delivery``) is handled by ``route``, or ``None`` (the default).

        It is entered before the handler is called and exited once the
        delivery is settled, in the handler's task (a sync handler's thread
        sees its context variables): ``on_error``, ``on_handled``,
        ``headers`` and the root publishes the handler makes run inside it.
        Duplicates and deliveries that cannot be decoded are not wrapped.
        """
        return None

    def publishing(
        self, broker: Broker, events: Sequence[Event]
    ) -> contextlib.AbstractContextManager[object] | None:
        """A context manager to enter around one root commit of ``events``
        (``Runtime.publish``, ``Runtime.commit``: root publishes and saga
        starts), or ``None`` (the default).

        Entered before the events are encoded, so it may add to their
        ``headers`` (fresh dicts made for this commit); exited after the
        commit, with the exception if it failed.
        """
        return None

    def headers(self, event: Event) -> Mapping[str, str] | None:
        """Headers to add to ``event``, which the handler running now emits
        (with the handler's ``handling`` context entered), or ``None``."""
        return None


class Hooks:
    """The middleware of one runtime, and the one loop that calls them.

    A failing middleware is logged and skipped: an observer must never undo
    a commit or fail a delivery. Each hook's bound methods are looked up
    when the middleware changes, not per event; callers test the hook's
    tuple before building its arguments, so a hook no middleware overrides
    costs nothing per event.
    """

    __slots__ = (
        "configured", "dead_lettered", "errors", "handled", "handling", "headers", "middleware", "on_publish",
        "publishing",
    )

    def __init__(self, middleware: Sequence[Middleware] = ()) -> None:
        self.configured = tuple(middleware)
        self._use(self.configured)

    def _use(self, middleware: tuple[Middleware, ...]) -> None:
        self.middleware = middleware
        #: Each hook only of the middleware that override it: callers test
        #: these tuples before doing any work for them, so a hook nobody
        #: overrides costs one test per event (a test recorder overrides
        #: only ``on_publish``, and would otherwise pay a call to the empty
        #: ``on_handled`` per handled event).
        self.on_publish = tuple(m.on_publish for m in middleware if _overrides(m, "on_publish"))
        #: ``on_handled`` and ``on_dead_letter``: ``call`` them.
        self.handled = tuple(m.on_handled for m in middleware if _overrides(m, "on_handled"))
        self.dead_lettered = tuple(m.on_dead_letter for m in middleware if _overrides(m, "on_dead_letter"))
        self.errors = tuple(m.on_error for m in middleware if _overrides(m, "on_error"))
        self.handling = tuple(m.handling for m in middleware if _overrides(m, "handling"))
        self.publishing = tuple(m.publishing for m in middleware if _overrides(m, "publishing"))
        self.headers = tuple(m.headers for m in middleware if _overrides(m, "headers"))

    def add(self, middleware: Middleware) -> None:
        """Call ``middleware`` too, until ``reset``."""
        self._use((*self.middleware, middleware))

    def reset(self) -> None:
        """Back to the configured middleware (drops what ``add`` added)."""
        self._use(self.configured)

    @staticmethod
    def call(hooks: tuple[Callable[..., None], ...], *args: Any) -> None:
        """Call each of ``hooks`` (bound methods of this runtime's middleware) with ``args``."""
        for hook in hooks:
            try:
                hook(*args)
            except Exception:
                log.exception("middleware %r failed in %s", hook.__self__, hook.__name__)  # type: ignore[attr-defined]

    def enter(
        self, hooks: tuple[Callable[..., contextlib.AbstractContextManager[object] | None], ...], *args: Any
    ) -> Entered:
        """Enter the context managers that ``hooks`` (``handling`` or
        ``publishing``) return for ``args``; ``Entered.exit`` leaves them. A
        hook that fails is logged and skipped, like any other."""
        return Entered(hooks, args)

    def stamp(self, event: Event) -> None:
        """Add the ``headers`` hooks' headers to ``event``, an event being
        built for publishing (its ``headers`` dict is its own)."""
        for hook in self.headers:
            try:
                extra = hook(event)
                if extra:
                    event.headers.update(extra)
            except Exception:
                log.exception("middleware %r failed in %s", hook.__self__, hook.__name__)  # type: ignore[attr-defined]

    def published(self, events: Iterable[tuple[Event, float | None]]) -> None:
        """Tell every middleware of committed ``events`` (with their delays)."""
        hooks = self.on_publish
        for event, _ in events:
            for hook in hooks:  # the loop of ``call``, inline: this runs for every emitted event
                try:
                    hook(event)
                except Exception:  # an observer must never undo a commit
                    log.exception("middleware %r failed in %s", hook.__self__, hook.__name__)  # type: ignore[attr-defined]


def _overrides(middleware: Middleware, name: str) -> bool:
    return getattr(type(middleware), name) is not getattr(Middleware, name)


class Entered:
    """The context managers of the ``handling`` or ``publishing`` hooks,
    entered in order; ``exit`` leaves them in reverse (also usable as a
    ``with`` block).

    A manager's own failures on exit are logged, not raised, and none can
    swallow an exception (what ``__exit__`` returns is ignored): an observer
    must never change how a delivery or a publish ends. This is the work
    ``contextlib.ExitStack`` and a guarding generator did, without their
    frames: it runs around every traced delivery (``brokers.speedups``
    has the figures).
    """

    __slots__ = ("_entered",)

    def __init__(
        self, hooks: tuple[Callable[..., contextlib.AbstractContextManager[object] | None], ...], args: tuple[Any, ...]
    ) -> None:
        entered: list[tuple[contextlib.AbstractContextManager[object], Callable[..., Any]]] = []
        for hook in hooks:
            try:
                manager = hook(*args)
                if manager is not None:
                    manager.__enter__()
                    entered.append((manager, hook))
            except Exception:
                log.exception("middleware %r failed in %s", hook.__self__, hook.__name__)  # type: ignore[attr-defined]
        self._entered = entered

    def exit(self, exc: BaseException | None = None) -> None:
        """Leave the managers in reverse order, telling each of ``exc``."""
        entered, self._entered = self._entered, []  # once only
        for manager, hook in reversed(entered):
            try:
                if exc is None:
                    manager.__exit__(None, None, None)
                else:
                    manager.__exit__(type(exc), exc, exc.__traceback__)
            except Exception:
                log.exception("middleware %r failed in %s", hook.__self__, hook.__name__)

    def __enter__(self) -> Entered:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self.exit(exc)
