"""The lifecycle contract between apps, the runtime and plug-ins.

An ``App`` needs one thing from a running system: a way to publish root
events (``Publisher``). The runtime attaches itself to each app it runs
(``App.attach``) once connected and detaches on stop, so an app never holds a
runtime type, and nothing finds a runtime through a module-level table.

Plug-ins (the saga coordinator, the saga test harness, a metrics poller) hook
the lifecycle with *lifespan hooks*, modelled on Starlette's lifespan: a hook
is a function taking the running system (``Running``) and returning an async
context manager. The runtime enters every hook after it has connected and
before it consumes anything, and exits them in reverse order after draining
its handlers. Whatever a hook starts through ``Running`` (background tasks,
middleware, extensions that handlers see) belongs to the runtime: the tasks
are cancelled after draining and before the hooks exit, and middleware and
extensions are dropped when the runtime stops. Example::

    @contextlib.asynccontextmanager
    async def poll_prices(runtime: Running) -> AsyncIterator[None]:
        runtime.start_task(refresh_prices_forever(runtime), name="prices")
        yield

    app.lifespan(poll_prices)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from brokers import Broker, CommitStatus, Message, StateWrite, Subscription
    from choreo.events import Event
    from choreo.middleware import Middleware
    from choreo.outbox import Outbox

__all__ = ("OUTBOX_RELAYS", "Lifespan", "Publisher", "Running")

#: The extension under which plug-ins list the outbox relays they run in a
#: runtime (objects with a ``pending`` flag: rows committed, not yet
#: published), so that ``choreo.testing`` waits for them to settle.
OUTBOX_RELAYS = "choreo.outbox_relays"


class Publisher(Protocol):
    """What an ``App`` needs from the system it runs in: publishing root events."""

    async def publish(
        self,
        type: str,
        data: dict[str, Any] | None = None,
        *,
        delay: float | None = None,
        **ids: Any,
    ) -> Event:
        """Publish a root event and return it once the broker holds it.

        Raises:
            DecodeError: invalid type name, data that is not JSON, or over the size limit.
            BrokerUnavailable: the broker refused or failed.
        """
        ...


class Running(Publisher, Protocol):
    """The running system as a lifespan hook sees it (a ``choreo.Runtime``).

    Attributes:
        broker: The connected broker.
        subscriptions: What its apps' routes consume (topic and group).
        in_flight: How many handlers are running now.
        middleware: The middleware observing it now, in call order.
        outbox: How its events are encoded (its size limit, the headers its
            middleware adds), for plug-ins that commit events elsewhere
            first (a database's outbox) and ``relay`` them later.
        extensions: Values hooks install for the handlers of this runtime,
            by a name of the plug-in's choosing; handlers read them as
            ``ctx.extensions``. Emptied when the runtime stops.
    """

    @property
    def broker(self) -> Broker: ...

    @property
    def subscriptions(self) -> tuple[Subscription, ...]: ...

    @property
    def in_flight(self) -> int: ...

    @property
    def middleware(self) -> tuple[Middleware, ...]: ...

    @property
    def outbox(self) -> Outbox: ...

    @property
    def extensions(self) -> dict[str, Any]: ...

    async def commit(
        self, events: Sequence[tuple[Event, float | None]], state: Sequence[StateWrite] = ()
    ) -> CommitStatus:
        """Publish events (with their delays) and write state in one atomic step.

        Raises:
            DecodeError: an event cannot be encoded.
            BrokerUnavailable: the broker refused or failed.
        """
        ...

    async def relay(self, messages: Sequence[Message]) -> None:
        """Publish events committed elsewhere first, already encoded (an
        outbox's rows), and tell the middleware they were published.

        Raises:
            BrokerUnavailable: the broker refused or failed.
        """
        ...

    def add_middleware(self, middleware: Middleware) -> None:
        """Observe what this runtime publishes and handles, until it stops."""
        ...

    def start_task(self, job: Coroutine[Any, Any, None], *, name: str) -> asyncio.Task[None]:
        """Run ``job`` beside the handlers; cancelled when the runtime stops
        (after draining, before the lifespan hooks exit)."""
        ...


#: A lifespan hook: called with the running system, it returns an async
#: context manager entered at start and exited at stop.
Lifespan = Callable[[Running], contextlib.AbstractAsyncContextManager[object]]
