"""What a saga compiles to: its two routes, and the events a transition commits.

The coordinator's app gets, per saga name, a route consuming the
participants' replies (``saga.reply.<name>``) and one consuming the timers
(``saga.timeout.<name>``). Both declare every command any version of the
saga may send, its timer and its lifecycle events, so ``choreo graph`` and
``choreo check`` see the whole chain.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from choreo.context import Context
from choreo.events import Event
from choreo.routing import Emit, Route
from choreo.saga.machine import SagaRun
from choreo.saga.run import Out
from choreo.saga.states import TERMINAL_STATES
from choreo.saga.topics import COMPENSATING, lifecycle_topic, reply_topic, timeout_topic

__all__ = ("Transition", "as_events", "saga_routes")

#: Applies one transition (a ``SagaRun`` entry point) to the saga an event names.
Transition = Callable[[Event, Context, Callable[[SagaRun], list[Out]]], Awaitable[list[Emit]]]


def saga_routes(service: str, name: str, commands: Sequence[str], transition: Transition) -> tuple[Route, Route]:
    """The reply and timer routes of saga ``name`` on ``service``."""
    emits = (
        *commands,
        timeout_topic(name),
        lifecycle_topic(name, COMPENSATING),
        *(lifecycle_topic(name, state.value) for state in TERMINAL_STATES),
    )

    async def on_reply(event: Event, ctx: Context) -> list[Emit]:
        return await transition(event, ctx, lambda run: run.on_reply(event.data))

    async def on_timeout(event: Event, ctx: Context) -> list[Emit]:
        return await transition(event, ctx, lambda run: run.on_timer(event.data))

    routes = []
    # State conflicts re-run a handler at once; these retries are for a
    # broker that failed mid-transition.
    pairs = ((reply_topic(name), on_reply, "reply"), (timeout_topic(name), on_timeout, "timeout"))
    for topic, handler, suffix in pairs:
        handler.__name__ = handler.__qualname__ = f"saga_{name}_{suffix}"
        routes.append(
            Route(
                event=topic,
                service=service,
                name=handler.__name__,
                handler=handler,
                emits=emits,
                retries=5,
                retry_delay=0.5,
            )
        )
    return routes[0], routes[1]


def as_events(outs: Sequence[Out], saga_id: str, correlation_id: str) -> list[tuple[Event, float | None]]:
    """A transition's outputs as root events (for ``start_saga`` and ``resume_saga``, which run outside a
    handler): the first caused the others, all carry the saga's ids."""
    events: list[tuple[Event, float | None]] = []
    cause: str | None = None
    for out in outs:
        headers: dict[str, Any] = dict(out.headers or {})
        event = Event(
            type=out.type,
            data=out.data,
            saga_id=saga_id,
            correlation_id=correlation_id,
            causation_id=cause,
            headers=headers,
        )
        cause = cause or event.id
        events.append((event, out.delay))
    return events
