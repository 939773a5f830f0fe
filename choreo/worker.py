"""Running apps: the consume loop, concurrency, lease renewal and draining.

``run(*apps, broker=url)`` is the one way apps run: ``choreo worker`` and
``choreo.testing.run_apps`` are built on it. Starting connects, attaches the
apps, enters their lifespan hooks, then consumes. Leaving the block stops
taking work, lets in-flight handlers finish for a grace period, cancels the
rest (their messages stay unacked and are redelivered), stops what the hooks
started, exits the hooks in reverse, detaches the apps and disconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import attrs

from brokers import Broker, BrokerError, CommitStatus, Delivery, Message, StateWrite, Subscription
from choreo.cancelling import cancel_and_wait
from choreo.dispatcher import Dispatcher
from choreo.errors import BrokerUnavailable, ConfigurationError
from choreo.events import Event, validate_event_type, with_headers
from choreo.failpoints import ACTIVE, hit
from choreo.middleware import Hooks, Middleware
from choreo.options import DATABASE_URL_ENV, RuntimeOptions
from choreo.outbox import Outbox

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
    """Apps running on one broker in this process: the ``Running`` system
    their lifespan hooks see (see ``choreo.lifecycle``).

    Use through ``run``. ``publish`` sends root events; ``in_flight`` counts
    handlers running now. Options come as a ``RuntimeOptions`` record, as
    keywords, or both (keywords win).

    Raises:
        ConfigurationError: an option out of range, or two apps with one name.
    """

    def __init__(
        self, apps: Sequence[App], broker: Broker, options: RuntimeOptions | None = None, **overrides: Any
    ) -> None:
        self.options = options = RuntimeOptions.of(options, **overrides)
        names = [app.name for app in apps]
        if len(set(names)) != len(names):
            raise ConfigurationError(f"two apps share a service name: {names}")
        self.apps = tuple(apps)
        self.broker = broker
        self.concurrency = options.concurrency
        self.grace = options.grace
        self.consumer = options.consumer or f"{socket.gethostname()}-{os.getpid()}-{id(self):x}"
        self.poll_interval = options.poll_interval
        self.extensions: dict[str, Any] = {}
        self.hooks = Hooks(options.middleware)
        self.outbox = Outbox(broker, self.hooks, max_size=options.max_size)
        self.routes = tuple(route for app in apps for route in app.routes)
        self.subscriptions = tuple(Subscription(route.event, route.group, route.start) for route in self.routes)
        self.dispatcher = Dispatcher(self.routes, self.outbox, extensions=self.extensions, settled=self._release)
        self._limits = {r.group: asyncio.Semaphore(r.concurrency) for r in self.routes if r.concurrency}
        #: Handlers running now: task, delivery and start time, by the delivery's id().
        self._in_flight: dict[int, tuple[asyncio.Task[None], Delivery, float]] = {}
        self._slot_freed = asyncio.Event()
        self._stopping = False
        #: Handlers cancelled by ``stop`` because they outlived the grace
        #: period (their deliveries stay unacked and are redelivered).
        self.cancelled = 0
        self._loops: list[asyncio.Task[None]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._lifespans = contextlib.AsyncExitStack()

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def middleware(self) -> tuple[Middleware, ...]:
        """The middleware called now: the configured ones, then those hooks added."""
        return self.hooks.middleware

    def add_middleware(self, middleware: Middleware) -> None:
        """Call ``middleware`` too until this runtime stops."""
        self.hooks.add(middleware)

    def start_task(self, job: Coroutine[Any, Any, None], *, name: str) -> asyncio.Task[None]:
        """Run ``job`` beside the handlers until this runtime stops (it is
        cancelled after draining, before the lifespan hooks exit)."""
        task = asyncio.get_running_loop().create_task(job, name=name)
        self._tasks.append(task)
        return task

    async def start(self) -> None:
        """Connect, attach the apps, enter the lifespan hooks (the run's,
        then each app's, in order), then start consuming.

        Raises:
            BrokerUnavailable: the broker cannot be reached.
            Exception: whatever a lifespan hook raised on entry; what the
                hooks entered so far have started is stopped first.
        """
        try:
            await self.broker.connect()
            await self.broker.subscribe(self.subscriptions)
        except BrokerError as exc:
            raise BrokerUnavailable(f"{self.broker.url}: {exc}") from exc
        for app in self.apps:
            app.attach(self)
        try:
            for hook in (*self.options.lifespan, *(h for app in self.apps for h in app.lifespans)):
                await self._lifespans.enter_async_context(hook(self))
        except BaseException:
            await self._shut_down()
            raise
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
            DecodeError: invalid type name or id, data that is not JSON, or over the size limit.
            ConfigurationError: a negative or non-finite ``delay``.
            BrokerUnavailable: the broker refused or failed.
        """
        validate_event_type(type)
        unknown = set(ids) - {"id", "correlation_id", "causation_id", "saga_id", "headers"}
        if unknown:
            raise TypeError(f"publish() got unexpected keyword arguments {sorted(unknown)}")
        if delay is not None and not 0 <= delay < math.inf:
            raise ConfigurationError(f"delay must be a number of seconds >= 0, not {delay}")
        fields = {k: v for k, v in ids.items() if v is not None}
        if "headers" in fields:
            fields["headers"] = dict(fields["headers"])  # the event's own: middleware may add to it
        event = Event(type=type, data=data or {}, **fields)
        if self.hooks.publishing:
            await self._commit_wrapped([(event, delay)], ())
        else:
            await self.outbox.commit([(event, delay)])
        return event

    async def commit(
        self, events: Sequence[tuple[Event, float | None]], state: Sequence[StateWrite] = ()
    ) -> CommitStatus:
        """Publish events and write state in one atomic step (no delivery to
        ack); see ``Outbox.commit``.

        Raises:
            DecodeError: an event cannot be encoded.
            BrokerUnavailable: the broker refused or failed.
        """
        if not self.hooks.publishing:
            return await self.outbox.commit(events, state)
        # Copies with headers of their own, for the middleware to add to.
        own = [(with_headers(event, dict(event.headers)), delay) for event, delay in events]
        return await self._commit_wrapped(own, state)

    async def relay(self, messages: Sequence[Message]) -> None:
        """Publish encoded events committed elsewhere first (see ``Outbox.relay``)."""
        await self.outbox.relay(messages)

    async def _commit_wrapped(
        self, events: Sequence[tuple[Event, float | None]], state: Sequence[StateWrite]
    ) -> CommitStatus:
        """``outbox.commit`` inside the middleware's ``publishing`` context managers."""
        with self.hooks.enter(self.hooks.publishing, self.broker, [event for event, _ in events]):
            return await self.outbox.commit(events, state)

    async def _consume(self) -> None:
        # Tasks made directly (``brokers.speedups``), unless the loop is of
        # another class or has a task factory: then by its create_task.
        loop = asyncio.get_running_loop()
        if loop.get_task_factory() is None and type(loop).create_task is asyncio.BaseEventLoop.create_task:
            new_task: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]] = partial(asyncio.Task, loop=loop)
        else:
            new_task = loop.create_task
        while not self._stopping:
            free = self.concurrency - len(self._in_flight)
            if free <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            try:
                deliveries = await self.broker.fetch(self.consumer, self.subscriptions, limit=min(free, 100),
                                                     timeout=self.poll_interval, max_size=self.outbox.max_size)
                if ACTIVE and deliveries:
                    await hit("worker.after_fetch")
            except Exception as exc:
                log.error("fetch from %s failed, retrying in 1s: %s", self.broker.url, exc)
                await asyncio.sleep(1.0)
                continue
            now = time.monotonic()
            for delivery in deliveries:
                limit = self._limits.get(delivery.group)
                handling = self.dispatcher.handle(delivery) if limit is None else self._limited(delivery, limit)
                self._in_flight[id(delivery)] = (new_task(handling), delivery, now)
            if deliveries:  # their first steps, then the commits they queue, go before the next wait
                await asyncio.sleep(0)  # (``brokers.speedups``)
                await asyncio.sleep(0)

    async def _limited(self, delivery: Delivery, limit: asyncio.Semaphore) -> None:
        try:
            async with limit:
                await self.dispatcher.handle(delivery)
        finally:
            self._release(delivery)  # also when cancelled before the handler started

    def _release(self, delivery: Delivery) -> None:
        """A handler is done (settled, failed or cancelled): free its slot."""
        self._in_flight.pop(id(delivery), None)
        self._slot_freed.set()

    async def _renew_leases(self) -> None:
        # Handlers slower than a third of the lease get it renewed, all in one call (hundreds renewed one
        # by one could outlast the lease), so no other consumer steals a delivery still being worked on.
        period = self.broker.visibility_timeout / 3
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            held = [delivery for _, delivery, started in self._in_flight.values() if now - started >= period]
            try:
                if held:
                    await self.broker.extend_many(held)
            except Exception as exc:
                log.warning("lease renewal of %d deliveries failed: %s", len(held), exc)

    async def stop(self, grace: float | None = None) -> None:
        """Stop taking work, drain in-flight handlers for ``grace`` seconds,
        cancel what is left (it stays unacked and is redelivered), then stop
        what the lifespan hooks started and exit them in reverse order."""
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
                self.cancelled = len(still)
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
        await self._shut_down()

    async def _shut_down(self) -> None:
        """Stop the hooks' tasks, exit the hooks in reverse, forget what
        they added, detach the apps: also after a hook failed to start."""
        try:
            tasks, self._tasks = self._tasks, []
            left = await cancel_and_wait(tasks, _CANCEL_WAIT)
            if left:
                log.warning("%d background tasks ignored cancellation; leaving them behind", len(left))
            await self._lifespans.aclose()
        finally:
            self.hooks.reset()
            self.extensions.clear()
            for app in self.apps:
                app.detach(self)


@contextlib.asynccontextmanager
async def run(
    *apps: App, broker: str | Broker | None = None, options: RuntimeOptions | None = None, **overrides: Any
) -> AsyncIterator[Runtime]:
    """Run ``apps`` on ``broker`` (a URL, a ``Broker``, or ``CHOREO_BROKER_URL``
    / ``memory://`` when ``None``) until the block is left.

    Options are those of ``RuntimeOptions`` (``concurrency``, ``grace``,
    ``middleware``, ``max_size``, ``consumer``, ``poll_interval``,
    ``lifespan``, ``database``), as a record, as keywords, or both (keywords
    win). With a ``database`` (or ``CHOREO_DATABASE_URL``), handlers may use
    ``ctx.transaction()``.

    Raises:
        ConfigurationError: an invalid broker URL or option.
        TypeError: a keyword that is not an option.
        BrokerUnavailable: the broker cannot be reached.
    """
    settings = RuntimeOptions.of(options, **overrides)
    database = settings.database or os.environ.get(DATABASE_URL_ENV)
    if database:
        from choreo.postgres.handlers import database_lifespan

        settings = attrs.evolve(settings, lifespan=(database_lifespan(database), *settings.lifespan))
    instance, owned = connect_broker(broker)
    try:
        runtime = Runtime(apps, instance, settings)
        await runtime.start()
        try:
            yield runtime
        finally:
            await runtime.stop()
    finally:
        if owned:
            await instance.close()


async def serve(
    apps: Sequence[App],
    *,
    broker: str | Broker | None = None,
    options: RuntimeOptions | None = None,
    ready: asyncio.Event | None = None,
    **overrides: Any,
) -> int:
    """Run ``apps`` until SIGINT or SIGTERM, then drain and return.

    This is what ``choreo worker`` runs; signal handling lives here so tests
    can reach it. Options as for ``run``; work that runs beside the apps (a
    metrics poller) is a ``lifespan`` hook starting a task.

    Returns:
        How many handlers were cancelled because the drain outlived the
        grace period (0: a clean drain).
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
        async with run(*apps, broker=broker, options=options, **overrides) as runtime:
            names = ", ".join(app.name for app in apps)
            log.info("worker %s running %s on %s (%d routes)", runtime.consumer, names, runtime.broker.url,
                     len(runtime.routes))
            if ready is not None:
                ready.set()
            await stop.wait()
            log.info("stopping: draining in-flight handlers")
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
    return runtime.cancelled
