"""Middleware: observers of what a runtime publishes and handles.

Metrics, test recorders and tracing are middleware. Hooks are synchronous and
must be cheap: they run on the per-event path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from choreo.events import Event
    from choreo.routing import Route

__all__ = ("Middleware", "Outcome")


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
