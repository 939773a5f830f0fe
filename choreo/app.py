"""``App``: one service, its routing table, and its way to publish."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from choreo.errors import ChoreoError, ConfigurationError
from choreo.events import Event
from choreo.routing import Handler, Route, Router, emits

if TYPE_CHECKING:
    from choreo.worker import Runtime

__all__ = ("App",)


class App:
    """One service: the handlers it runs, declared with decorators.

    Args:
        name: The service name; consumer groups are ``<name>.<handler>``.

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
        self._runtime: Runtime | None = None

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

        Raises:
            ConfigurationError: invalid names or options, a duplicate handler,
                or a parameter that cannot be injected.
        """
        return self.router.on_event(
            event, name=name, retries=retries, retry_delay=retry_delay, timeout=timeout, concurrency=concurrency
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
        """Register a saga participant action or compensation named ``name``.

        The handler consumes ``saga.cmd.<service>.<name>`` commands; its
        returned dict is merged into the saga's data. Its retries are the
        step's policy, never its own.
        """
        from choreo.saga.participant import register_action

        def register(handler: Handler) -> Handler:
            register_action(self, name, handler)
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
        handler of this service, or its name) in a choreographed saga: it runs
        when any of the ``on`` failure events arrives. Works with ``@emits``
        in either order; returns the handler unchanged.
        """
        from choreo.saga.choreography import register_compensation

        def register(handler: Handler) -> Handler:
            register_compensation(self, target, on, handler, name=name, retries=retries, retry_delay=retry_delay)
            return handler

        return register

    # -- running ---------------------------------------------------------------

    def _bind(self, runtime: Runtime) -> None:
        self._runtime = runtime

    def _unbind(self, runtime: Runtime) -> None:
        if self._runtime is runtime:
            self._runtime = None

    @property
    def runtime(self) -> Runtime:
        """The runtime this app is running in.

        Raises:
            ChoreoError: the app is not running (use ``choreo.run``).
        """
        if self._runtime is None:
            raise ChoreoError(f"app {self.name!r} is not running; start it with `async with choreo.run(app):`")
        return self._runtime

    async def publish(
        self,
        type: str,
        data: dict[str, Any] | None = None,
        *,
        delay: float | None = None,
        **ids: Any,
    ) -> Event:
        """Publish a root event from this service (see ``Runtime.publish``)."""
        return await self.runtime.publish(type, data, delay=delay, **ids)
