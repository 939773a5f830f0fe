"""Middleware: observers of what a runtime publishes and handles.

Metrics, test recorders and tracing are middleware. Hooks are synchronous and
must be cheap: they run on the per-event path. ``Hooks`` is the one loop that
calls them, shared by the runtime's outbox and its dispatcher.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from choreo.events import Event
    from choreo.routing import Route

__all__ = ("Hooks", "Middleware", "Outcome")

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


class Hooks:
    """The middleware of one runtime, and the one loop that calls them.

    A failing middleware is logged and skipped: an observer must never undo
    a commit or fail a delivery. Each hook's bound methods are looked up
    when the middleware changes, not per event; callers test ``middleware``
    before building hook arguments, so a runtime without middleware pays
    nothing per event.
    """

    __slots__ = ("configured", "dead_lettered", "handled", "middleware", "on_publish")

    def __init__(self, middleware: Sequence[Middleware] = ()) -> None:
        self.configured = tuple(middleware)
        self._use(self.configured)

    def _use(self, middleware: tuple[Middleware, ...]) -> None:
        self.middleware = middleware
        self.on_publish = tuple(m.on_publish for m in middleware)
        #: ``on_handled`` and ``on_dead_letter`` of every middleware: ``call`` them.
        self.handled = tuple(m.on_handled for m in middleware)
        self.dead_lettered = tuple(m.on_dead_letter for m in middleware)

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

    def published(self, events: Iterable[tuple[Event, float | None]]) -> None:
        """Tell every middleware of committed ``events`` (with their delays)."""
        for event, _ in events:
            self.call(self.on_publish, event)
