"""Choreographed sagas: compensations declared against the handlers they undo.

A choreography is already a saga when a failure event makes earlier services
undo their work. ``@app.compensates(handler, on=...)`` says so explicitly: the
decorated function runs when any of the ``on`` events arrives and undoes what
``handler`` did. It is an ordinary route (so ``choreo graph`` and ``choreo
check`` see it), with more retries than a forward step by default, because a
compensation that gives up leaves the system inconsistent. The relation is
recorded and listed by ``compensations(app)``.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING

import attrs

from choreo.errors import ConfigurationError
from choreo.routing import Handler

if TYPE_CHECKING:
    from choreo.app import App

__all__ = ("Compensation", "compensations", "register_compensation")

_registry: weakref.WeakKeyDictionary[App, list[Compensation]] = weakref.WeakKeyDictionary()


@attrs.frozen
class Compensation:
    """``handler`` (a route name of the service) undoes ``target`` when ``trigger`` arrives."""

    service: str
    target: str
    trigger: str
    handler: str


def compensations(app: App) -> list[Compensation]:
    """The compensations declared on ``app``, in declaration order."""
    return list(_registry.get(app, ()))


def register_compensation(
    app: App,
    target: Handler | str,
    on: str | Sequence[str],
    handler: Handler,
    *,
    name: str | None = None,
    retries: int = 10,
    retry_delay: float = 1.0,
) -> None:
    """Subscribe ``handler`` to each ``on`` event as the compensation of ``target``.

    Raises:
        ConfigurationError: ``target`` is not a handler of ``app``, no trigger
            is given, a trigger is the event ``target`` itself consumes, or
            the route is invalid.
    """
    triggers = (on,) if isinstance(on, str) else tuple(on)
    if not triggers:
        raise ConfigurationError(f"@compensates for {handler.__name__!r} needs at least one trigger event in on=")
    targets = [r for r in app.routes if (r.handler is target if callable(target) else r.name == target)]
    if not targets:
        shown = getattr(target, "__name__", target)
        raise ConfigurationError(f"@compensates: {shown!r} is not a handler of service {app.name!r}")
    consumed = {r.event for r in targets}
    for trigger in triggers:
        if trigger in consumed:
            raise ConfigurationError(f"@compensates: {trigger!r} is what {targets[0].name!r} consumes, not a failure")
    base = name or handler.__name__
    for trigger in triggers:
        # One consumer group per trigger: a route name is its group name.
        route_name = base if len(triggers) == 1 else f"{base}_on_{trigger.replace('.', '_').replace('-', '_')}"
        app.router.on_event(trigger, name=route_name, retries=retries, retry_delay=retry_delay)(handler)
        _registry.setdefault(app, []).append(Compensation(app.name, targets[0].name, trigger, route_name))
