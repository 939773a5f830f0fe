"""Middleware: observers of what a runtime publishes and handles.

Metrics, test recorders and tracing are middleware. Hooks are synchronous and
must be cheap: they run on the per-event path. ``Hooks`` is the one loop that
calls them, shared by the runtime's outbox and its dispatcher.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
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
    """The middleware of one runtime, and the loop that calls them.

    A failing middleware is logged and skipped: an observer must never undo
    a commit or fail a delivery. ``middleware`` is empty-tested by callers
    before they build hook arguments, so a runtime without middleware pays
    nothing per event.
    """

    __slots__ = ("configured", "middleware")

    def __init__(self, middleware: Sequence[Middleware] = ()) -> None:
        self.configured = tuple(middleware)
        self.middleware = self.configured

    def add(self, middleware: Middleware) -> None:
        """Call ``middleware`` too, until ``reset``."""
        self.middleware = (*self.middleware, middleware)

    def reset(self) -> None:
        """Back to the configured middleware (drops what ``add`` added)."""
        self.middleware = self.configured

    def call(self, hook: str, *args: Any) -> None:
        """Call method ``hook`` of every middleware with ``args``."""
        for middleware in self.middleware:
            try:
                getattr(middleware, hook)(*args)
            except Exception:
                log.exception("middleware %r failed in %s", middleware, hook)

    def published(self, events: Iterable[Event]) -> None:
        for event in events:
            self.call("on_publish", event)
