"""``App``: one service, its routing table, and its way to publish."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from brokers import Start
from choreo.errors import ChoreoError, ConfigurationError
from choreo.events import Event
from choreo.lifecycle import Lifespan, Publisher
from choreo.routing import Handler, Route, Router, emits

__all__ = ("App",)


class App:
    """One service: the handlers it runs, declared with decorators.

    Args:
        name: The service name; consumer groups are ``<name>.<handler>``.

    Attributes:
        extensions: Plug-ins attached to this app, by a name of their
            choosing (the saga coordinator is ``extensions["saga"]``).

    Example::

        app = App("inventory_service")

        @app.on_event("order.created")
        @app.emits("inventory.reserved", "inventory.insufficient")
        async def reserve_inventory(data: dict) -> dict:
            return {"reservation_id": "R-1"}
    """

    def __init__(self, name: str) -> None:
        if not name or not name.replace("_", "a").replace("-", "a").isalnum():
            raise ConfigurationError(f"service name {name!r} must be letters, digits, '_' or '-'")
        self.name = name
        self.router = Router(name)
        self.extensions: dict[str, Any] = {}
        self._lifespans: list[Lifespan] = []
        # The systems running this app now, most recent last (one, unless a
        # process runs the same app in two runtimes, as tests of failover do).
        self._publishers: list[Publisher] = []

    def __repr__(self) -> str:
        return f"App({self.name!r}, routes={len(self.router)})"

    @property
    def routes(self) -> tuple[Route, ...]:
        """The routing table of this service, as frozen ``Route`` records."""
        return self.router.routes

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
        """Subscribe the decorated handler to ``event``; returns it unchanged.

        Args:
            event: The event type to consume.
            name: The handler name (default: the function's name).
            retries: Retries after the first attempt (at most ``1 + retries`` attempts).
            retry_delay: Base of the exponential backoff in seconds; attempt k
                waits ``retry_delay * 2**(k-1)`` times a jitter in [0.75, 1.25].
            timeout: Seconds per attempt; a timeout is a failed attempt.
            concurrency: Most attempts of this handler running at once per worker.
            start: Where the handler's consumer group starts the first time it
                is created: ``"auto"`` (the stream's beginning if no handler
                reads it yet, so events published before the first workers
                are delivered; else its end), ``"beginning"`` (replay what
                the stream holds, e.g. for a new projection) or ``"end"``
                (new events only). An existing group goes on from where it is.

        Raises:
            ConfigurationError: invalid names or options, a duplicate handler,
                or a parameter that cannot be injected.
        """
        return self.router.on_event(
            event, name=name, retries=retries, retry_delay=retry_delay, timeout=timeout, concurrency=concurrency,
            start=start,
        )

    @staticmethod
    def emits(success: str, *others: str) -> Callable[[Handler], Handler]:
        """Declare the emitted events: ``success`` first, the failure event
        second. Works above or below ``on_event``."""
        return emits(success, *others)

    def include_router(self, router: Router) -> None:
        """Add the routes of a ``Router`` (handlers defined in another module)."""
        self.router.include(router)

    def action(self, name: str) -> Callable[[Handler], Handler]:
        """Register a saga participant action or compensation named ``name``
        (see ``Router.action``); returns the handler unchanged."""
        return self.router.action(name)

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
        handler of this service, or its name) in a choreographed saga: it runs
        when any of the ``on`` failure events arrives. Works with ``@emits``
        in either order; returns the handler unchanged (see ``Router.compensates``).
        """
        return self.router.compensates(target, on=on, name=name, retries=retries, retry_delay=retry_delay)

    # -- running ---------------------------------------------------------------

    def lifespan(self, hook: Lifespan) -> Lifespan:
        """Run ``hook`` while this app runs; returns it unchanged (usable as
        a decorator). The runtime enters the hooks of its apps in the order
        added, after connecting and before consuming, and exits them in
        reverse after draining (see ``choreo.lifecycle``)."""
        self._lifespans.append(hook)
        return hook

    @property
    def lifespans(self) -> tuple[Lifespan, ...]:
        """The lifespan hooks of this app, in the order added."""
        return tuple(self._lifespans)

    def attach(self, publisher: Publisher) -> None:
        """Publish through ``publisher`` from now on: a runtime calls this
        when it starts running this app."""
        self._publishers.append(publisher)

    def detach(self, publisher: Publisher) -> None:
        """Stop publishing through ``publisher`` (a runtime stopping)."""
        if publisher in self._publishers:
            self._publishers.remove(publisher)

    @property
    def running(self) -> bool:
        """Whether a runtime runs this app now."""
        return bool(self._publishers)

    async def publish(
        self,
        type: str,
        data: dict[str, Any] | None = None,
        *,
        delay: float | None = None,
        **ids: Any,
    ) -> Event:
        """Publish a root event from this service (see ``Runtime.publish``).

        Raises:
            ChoreoError: the app is not running (use ``choreo.run``).
            DecodeError: invalid type name, data that is not JSON, or over the size limit.
            BrokerUnavailable: the broker refused or failed.
        """
        if not self._publishers:
            raise ChoreoError(f"app {self.name!r} is not running; start it with `async with choreo.run(app):`")
        return await self._publishers[-1].publish(type, data, delay=delay, **ids)
