"""Running apps: the consume loop, concurrency, lease renewal and draining.

``run(*apps, broker=url)`` is the one way apps run: ``choreo worker`` and
``choreo.testing.run_apps`` are built on it. Leaving the block stops taking
work, lets in-flight handlers finish for a grace period, cancels the rest
(their messages stay unacked and are redelivered) and disconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from brokers import Broker, BrokerError, CommitStatus, Delivery, StateWrite, Subscription
from choreo.cancelling import cancel_and_wait
from choreo.dispatcher import Dispatcher
from choreo.errors import BrokerUnavailable, ConfigurationError
from choreo.events import DEFAULT_MAX_SIZE, Event, validate_event_type
from choreo.failpoints import ACTIVE, hit
from choreo.middleware import Middleware

if TYPE_CHECKING:
    from choreo.app import App

__all__ = ("DEFAULT_BROKER_URL", "Runtime", "connect_broker", "run", "serve")

log = logging.getLogger("choreo.worker")

DEFAULT_BROKER_URL = "memory://"

# How long a stopping worker waits for cancelled tasks to end.
_CANCEL_WAIT = 5.0


def broker_url_from_env(url: str | None = None) -> str:
    """``url``, else ``CHOREO_BROKER_URL``, else ``memory://``."""
    return url or os.environ.get("CHOREO_BROKER_URL") or DEFAULT_BROKER_URL


def connect_broker(broker: str | Broker | None) -> tuple[Broker, bool]:
    """A broker instance for ``broker`` and whether the caller owns it."""
    if broker is None or isinstance(broker, str):
        import brokers

        try:
            return brokers.from_url(broker_url_from_env(broker)), True
        except BrokerError as exc:
            raise ConfigurationError(str(exc)) from None
    return broker, False


class Runtime:
    """Apps running on one broker in this process.

    Use through ``run``. ``publish`` sends root events; ``in_flight`` counts
    handlers running now.
    """

    def __init__(
        self,
        apps: Sequence[App],
        broker: Broker,
        *,
        concurrency: int = 64,
        grace: float = 10.0,
        consumer: str | None = None,
        middleware: Sequence[Middleware] = (),
        max_size: int = DEFAULT_MAX_SIZE,
        poll_interval: float = 0.1,
    ) -> None:
        if concurrency < 1:
            raise ConfigurationError("concurrency must be at least 1")
        names = [app.name for app in apps]
        if len(set(names)) != len(names):
            raise ConfigurationError(f"two apps share a service name: {names}")
        self.apps = tuple(apps)
        self.broker = broker
        self.concurrency = concurrency
        self.grace = grace
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{id(self):x}"
        self.middleware = list(middleware)
        self.poll_interval = poll_interval
        self.routes = tuple(route for app in apps for route in app.routes)
        self.subscriptions = tuple(Subscription(route.event, route.group) for route in self.routes)
        self.dispatcher = Dispatcher(self.routes, broker, middleware=self.middleware, max_size=max_size)
        self._limits = {r.group: asyncio.Semaphore(r.concurrency) for r in self.routes if r.concurrency}
        #: Handlers running now: task, delivery and start time, by a serial number.
        self._in_flight: dict[int, tuple[asyncio.Task[None], Delivery, float]] = {}
        self._serial = 0
        self._slot_freed = asyncio.Event()
        self._stopping = False
        self._loops: list[asyncio.Task[None]] = []

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def add_middleware(self, middleware: Middleware) -> None:
        self.middleware.append(middleware)
        self.dispatcher.middleware = tuple(self.middleware)

    async def start(self) -> None:
        try:
            await self.broker.connect()
            await self.broker.subscribe(self.subscriptions)
        except BrokerError as exc:
            raise BrokerUnavailable(f"{self.broker.url}: {exc}") from exc
        for app in self.apps:
            app._bind(self)
        if self.subscriptions:
            self._loops.append(asyncio.create_task(self._consume(), name="choreo-consume"))
            self._loops.append(asyncio.create_task(self._renew_leases(), name="choreo-leases"))

    async def publish(
        self,
        type: str,
        data: dict[str, Any] | None = None,
        *,
        delay: float | None = None,
        **ids: Any,
    ) -> Event:
        """Publish a root event; ``ids`` may set ``id``, ``correlation_id``,
        ``causation_id``, ``saga_id`` and ``headers``.

        Raises:
            DecodeError: invalid type name, data that is not JSON, or over the size limit.
            BrokerUnavailable: the broker refused or failed.
        """
        validate_event_type(type)
        unknown = set(ids) - {"id", "correlation_id", "causation_id", "saga_id", "headers"}
        if unknown:
            raise TypeError(f"publish() got unexpected keyword arguments {sorted(unknown)}")
        if delay is not None and delay < 0:
            raise ValueError("delay must be >= 0")
        event = Event(type=type, data=data or {}, **{k: v for k, v in ids.items() if v is not None})
        await self.commit([(event, delay)])
        return event

    async def commit(
        self, events: Sequence[tuple[Event, float | None]], state: Sequence[StateWrite] = ()
    ) -> CommitStatus:
        """Publish events and write state in one atomic step (no delivery to ack)."""
        messages = [self.dispatcher.message(event, delay=delay) for event, delay in events]
        try:
            if state:
                status = await self.broker.commit(None, publish=messages, state=state)
            else:
                await self.broker.publish(messages)
                status = CommitStatus.OK
        except BrokerError as exc:
            raise BrokerUnavailable(f"publish to {self.broker.url} failed: {exc}") from exc
        if status is CommitStatus.OK:
            self.dispatcher.published([event for event, _ in events])
        return status

    async def _consume(self) -> None:
        # loop.create_task, not asyncio.create_task: the latter looks the loop
        # up per call, and on Linux each lookup is a getpid() system call.
        loop = asyncio.get_running_loop()
        while not self._stopping:
            free = self.concurrency - len(self._in_flight)
            if free <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            try:
                deliveries = await self.broker.fetch(
                    self.consumer, self.subscriptions, limit=min(free, 100), timeout=self.poll_interval
                )
                if ACTIVE and deliveries:
                    await hit("worker.after_fetch")
            except Exception as exc:
                log.error("fetch from %s failed, retrying in 1s: %s", self.broker.url, exc)
                await asyncio.sleep(1.0)
                continue
            now = time.monotonic()
            for delivery in deliveries:
                self._serial += 1
                key = self._serial
                limit = self._limits.get(delivery.group)
                if limit is None:
                    handling = self.dispatcher.handle(delivery, self._release, key)
                else:
                    handling = self._limited(delivery, limit, key)
                self._in_flight[key] = (loop.create_task(handling), delivery, now)

    async def _limited(self, delivery: Delivery, limit: asyncio.Semaphore, key: int) -> None:
        try:
            async with limit:
                await self.dispatcher.handle(delivery)
        finally:
            self._release(key)

    def _release(self, key: int) -> None:
        """A handler is done (settled, failed or cancelled): free its slot."""
        self._in_flight.pop(key, None)
        self._slot_freed.set()

    async def _renew_leases(self) -> None:
        # Handlers slower than a third of the lease get it renewed, so no other
        # consumer steals a delivery that is still being worked on.
        period = self.broker.visibility_timeout / 3
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for _, delivery, started in list(self._in_flight.values()):
                if now - started >= period:
                    try:
                        await self.broker.extend(delivery)
                    except Exception as exc:
                        log.warning("could not renew the lease on %s: %s", delivery.entry_id, exc)

    async def stop(self, grace: float | None = None) -> None:
        """Stop taking work, drain in-flight handlers for ``grace`` seconds,
        cancel what is left (it stays unacked and is redelivered)."""
        if self._stopping:
            return
        self._stopping = True
        self._slot_freed.set()
        grace = self.grace if grace is None else grace
        if self._loops:
            # The consume loop ends on the flag, within one poll interval. It is
            # waited for, not awaited: a cancellation of stop() itself must not
            # be mistaken for the loop's own end and swallowed.
            await asyncio.wait(self._loops[:1])
        pending = {task for task, _, _ in self._in_flight.values()}
        if pending:
            log.info("draining %d in-flight handlers (grace %.1fs)", len(pending), grace)
            _, still = await asyncio.wait(pending, timeout=grace)
            if still:
                log.warning("cancelling %d handlers still running after %.1fs; they will be redelivered",
                            len(still), grace)
                left = await cancel_and_wait(still, _CANCEL_WAIT)
                if left:
                    log.warning("%d handlers ignored cancellation for %.0fs; leaving them behind", len(left),
                                _CANCEL_WAIT)
            # A handler cancelled before its first step never ran its own clean-up.
            for key, (task, _, _) in list(self._in_flight.items()):
                if task.done():
                    del self._in_flight[key]
        if await cancel_and_wait(self._loops[1:], _CANCEL_WAIT):
            log.warning("the lease renewal loop ignored cancellation; leaving it behind")
        for app in self.apps:
            app._unbind(self)


@contextlib.asynccontextmanager
async def run(
    *apps: App,
    broker: str | Broker | None = None,
    concurrency: int = 64,
    grace: float = 10.0,
    middleware: Sequence[Middleware] = (),
    max_size: int = DEFAULT_MAX_SIZE,
    consumer: str | None = None,
) -> AsyncIterator[Runtime]:
    """Run ``apps`` on ``broker`` (a URL, a ``Broker``, or ``CHOREO_BROKER_URL``
    / ``memory://`` when ``None``) until the block is left.

    Raises:
        ConfigurationError: an invalid broker URL or option.
        BrokerUnavailable: the broker cannot be reached.
    """
    instance, owned = connect_broker(broker)
    runtime = Runtime(
        apps, instance, concurrency=concurrency, grace=grace, middleware=middleware, max_size=max_size,
        consumer=consumer,
    )
    try:
        await runtime.start()
        yield runtime
    finally:
        try:
            await runtime.stop()
        finally:
            if owned:
                await instance.close()


async def serve(
    apps: Sequence[App],
    *,
    broker: str | Broker | None = None,
    concurrency: int = 64,
    grace: float = 10.0,
    middleware: Sequence[Middleware] = (),
    ready: asyncio.Event | None = None,
    background: Sequence[Callable[[Runtime], Coroutine[Any, Any, None]]] = (),
) -> None:
    """Run ``apps`` until SIGINT or SIGTERM, then drain and return.

    This is what ``choreo worker`` runs; signal handling lives here so tests
    can reach it. ``background`` coroutines (e.g. a metrics poller) run beside
    the runtime and are cancelled when it stops.
    """
    import signal

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, stop.set)
            installed.append(signum)
        except RuntimeError:  # not the main thread: whoever runs us owns the signals
            pass
    try:
        async with run(*apps, broker=broker, concurrency=concurrency, grace=grace, middleware=middleware) as runtime:
            names = ", ".join(app.name for app in apps)
            log.info("worker %s running %s on %s (%d routes)", runtime.consumer, names, runtime.broker.url,
                     len(runtime.routes))
            tasks = [asyncio.create_task(job(runtime)) for job in background]
            if ready is not None:
                ready.set()
            try:
                await stop.wait()
            finally:
                await cancel_and_wait(tasks, _CANCEL_WAIT)
            log.info("stopping: draining in-flight handlers")
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
