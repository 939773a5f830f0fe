"""Choreographed sagas: compensations declared against the handlers they undo.

A choreography is already a saga when a failure event makes earlier services
undo their work. ``@app.compensates(handler, on=...)`` (``Router.compensates``
in the core) says so explicitly: the decorated function runs when any of the
``on`` events arrives and undoes what ``handler`` did. It is an ordinary route
(so ``choreo graph`` and ``choreo check`` see it), with more retries than a
forward step by default, because a compensation that gives up leaves the
system inconsistent. The router keeps the relation; ``compensations(app)``
lists it.
"""

from __future__ import annotations

from choreo.actions import Compensation
from choreo.app import App

__all__ = ("Compensation", "compensations")


def compensations(app: App) -> list[Compensation]:
    """The compensations declared on ``app``, in declaration order."""
    return list(app.router.compensations)
