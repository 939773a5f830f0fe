"""``SagaCoordinator``: sagas compiled into handlers of an app's routing table.

For each saga the coordinator adds two routes to its app: one consumes the
participants' replies (``saga.reply.<name>``), one the delayed timers
(``saga.timeout.<name>``). Each reads the saga's record from its store
(``choreo.saga.stores``), applies one transition of ``choreo.saga.machine``
and writes the record (compare-and-set) with the commands, timers and
lifecycle events it causes in one step, before the ack. A coordinator process
holds nothing a crash could lose: kill it, and another finishes every saga.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any

from brokers import CommitStatus
from choreo import logs
from choreo.codec import ID_PATTERN
from choreo.context import Context
from choreo.errors import ChoreoError, ConfigurationError
from choreo.events import Event, new_event_id
from choreo.failpoints import ACTIVE, hit
from choreo.routing import Emit
from choreo.saga import defined, sweeper
from choreo.saga.definition import (
    Parallel,
    SagaDefinition,
    SagaNotFound,
    SagaResult,
    SagaState,
    SagaStep,
)
from choreo.saga.machine import SagaRun
from choreo.saga.metrics import SagaMetrics
from choreo.saga.record import new_record, to_result
from choreo.saga.routes import as_events, saga_routes
from choreo.saga.run import Out
from choreo.saga.store import parse_state
from choreo.saga.stores import BrokerStateStore, SagaStateStore
from choreo.saga.versions import SagaVersions, version_missing
from choreo.saga.waiting import SagaWaiters

if TYPE_CHECKING:
    from choreo.app import App
    from choreo.lifecycle import Running

__all__ = ("SagaCoordinator", "coordinator_of")

log = logging.getLogger("choreo.saga")

#: The coordinator's name among its app's ``extensions``.
EXTENSION = "saga"

#: Times a transition reads the record again after losing its compare-and-set.
MAX_CONFLICTS = 20


def coordinator_of(app: App) -> SagaCoordinator | None:
    """The coordinator attached to ``app``, if any."""
    coordinator = app.extensions.get(EXTENSION)
    return coordinator if isinstance(coordinator, SagaCoordinator) else None


class SagaCoordinator:
    """Runs sagas defined on ``app``: the orchestrator, as handlers of ``app``.

    It is a plug-in of ``app`` (``app.extensions["saga"]``) with a lifespan
    hook: while a runtime runs the app, the coordinator's waiter middleware
    and its sweeper run in that runtime, and stop with it.

    Args:
        app: The service whose routing table gets the saga handlers.
        persistence_enabled: The seed's name for ``persistence`` (wins when given).
        state_store: Where saga records live (a ``SagaStateStore``): ``None``
            keeps them in the broker's state under ``key_prefix``, committed
            with the events; ``choreo.postgres.PostgresStateStore()`` in
            PostgreSQL tables.
        debug: Log the saga data on every transition (may contain personal data).
        trace_enabled: Log per-event detail (commands, replies, tokens).
        persistence: Keep finished sagas in the state store (``get_saga_state``
            after the end, and a ``saga_id`` never starts twice). When false,
            a saga's record is deleted in the commit that ends it.
        sweep_interval: Seconds between sweeps for sagas whose step or
            deadline is overdue by more than this (their timer was lost);
            ``None`` turns the sweeper off.
        poll_interval: Seconds between state reads while waiting for a saga
            that another process is running.
        key_prefix: Prefix of the state keys (``saga:<id>``).

    Raises:
        ConfigurationError: ``app`` already has a coordinator, or
            ``state_store`` is not a ``SagaStateStore``.
    """

    def __init__(
        self,
        app: App,
        *,
        persistence_enabled: bool | None = None,
        state_store: object | None = None,
        debug: bool = False,
        trace_enabled: bool = False,
        persistence: bool = True,
        sweep_interval: float | None = 10.0,
        poll_interval: float = 0.5,
        key_prefix: str = "saga:",
    ) -> None:
        if EXTENSION in app.extensions:
            raise ConfigurationError(f"app {app.name!r} already has a SagaCoordinator")
        if persistence_enabled is not None:
            persistence = persistence_enabled
        if state_store is not None and not isinstance(state_store, SagaStateStore):
            raise ConfigurationError(
                f"state_store={state_store!r} is not a saga state store: use None (the broker's state) "
                "or choreo.postgres.PostgresStateStore()"
            )
        if sweep_interval is not None and sweep_interval <= 0:
            raise ConfigurationError("sweep_interval must be positive or None")
        self.app = app
        self.debug = debug
        self.trace_enabled = trace_enabled or debug
        self.persistence = persistence
        self.sweep_interval = sweep_interval
        self.poll_interval = poll_interval
        self.key_prefix = key_prefix
        self.store: SagaStateStore = BrokerStateStore(key_prefix) if state_store is None else state_store
        self.definitions: dict[str, SagaDefinition] = {}
        self.versions = SagaVersions()
        self._waiters = SagaWaiters(self.get_saga_state)
        #: The runtimes running ``app`` now, most recent last.
        self._runtimes: list[Running] = []
        app.extensions[EXTENSION] = self
        app.lifespan(self._lifespan)
        defined.remember(self)

    def __repr__(self) -> str:
        return f"SagaCoordinator({self.app.name!r}, sagas={sorted(self.definitions)})"

    # -- definitions -------------------------------------------------------------

    def define_saga(
        self,
        name: str,
        steps: Sequence[SagaStep | Parallel],
        *,
        version: int = 1,
        deadline: float | None = None,
        **unknown: Any,
    ) -> SagaDefinition:
        """Define (a version of) a saga and compile it into ``app``'s routing table.

        Several versions of one name may be defined at once: ``start_saga``
        starts the highest, and a saga in flight finishes on its own.

        Args:
            name: The saga's name (``saga.<name>.*`` events).
            steps: The steps (and ``Parallel`` groups), run in order and
                compensated in reverse.
            version: The version of this definition (an integer >= 1).
            deadline: Seconds after the start at which a saga still running
                fails at its current step and compensates.

        Raises:
            ConfigurationError: that version of the saga is already defined,
                or the definition is invalid (see ``SagaDefinition.build``).
        """
        definition = SagaDefinition.build(name, steps, version=version, deadline=deadline, **unknown)
        if self.versions.get(name, version) is not None:
            raise ConfigurationError(f"saga {name!r} version {version} is already defined on {self.app.name!r}")
        self.versions.add(definition)

        async def transition(event: Event, ctx: Context, step: Callable[[SagaRun], list[Out]]) -> list[Emit]:
            return await self._transition(name, event, ctx, step)

        # A later version replaces the routes: they declare the commands of every version.
        for route in saga_routes(self.app.name, name, self.versions.commands(name), transition):
            self.app.router.add(route, replace=True)
        latest = self.versions.latest(name)
        assert latest is not None
        self.definitions[name] = latest
        return definition

    def definition(self, name: str) -> SagaDefinition:
        """The definition of saga ``name``.

        Raises:
            ConfigurationError: no saga of that name is defined here.
        """
        try:
            return self.definitions[name]
        except KeyError:
            known = ", ".join(sorted(self.definitions)) or "none"
            raise ConfigurationError(f"no saga {name!r} on {self.app.name!r} (defined: {known})") from None

    # -- running sagas -------------------------------------------------------------

    async def start_saga(
        self,
        name: str,
        data: dict[str, Any] | None = None,
        *,
        saga_id: str | None = None,
        wait: bool = True,
        timeout: float | None = None,
        correlation_id: str | None = None,
    ) -> SagaResult:
        """Start saga ``name`` with ``data``; the coordinator's app must be running.

        The record, the ``started`` event, the first command and its timer
        are committed in one step. A ``saga_id`` that exists already is not
        started again: the call returns (or waits for) that saga.

        Every event of the saga (commands, replies, timers, lifecycle events)
        carries ``correlation_id``; by default that of the event whose
        handler is starting the saga, else the saga id.

        Returns:
            The saga when it ends (``wait=True``), or as started.

        Raises:
            ConfigurationError: unknown saga, or an invalid ``saga_id``.
            ChoreoError: the app is not running.
            TimeoutError: still running after ``timeout`` seconds (it goes on).
        """
        definition = self.definition(name)
        runtime = self._runtime()
        saga_id = saga_id or new_event_id()
        if not isinstance(saga_id, str) or not ID_PATTERN.fullmatch(saga_id):
            raise ConfigurationError(f"saga_id {saga_id!r} must be 1-128 letters, digits or '._:-'")
        if correlation_id is None:
            handling = logs.current()
            correlation_id = handling.correlation_id if handling is not None else None
        record = new_record(definition, saga_id, dict(data or {}), time.time(), correlation_id)
        lines: list[tuple[str, str]] = []
        outs = SagaRun(definition, record, time.time(), lambda i, line: lines.append((i, line)), self._detail).start()
        future = self._waiters.add(saga_id) if wait else None
        try:
            if ACTIVE:
                await hit("saga.before_state_write", name)
            status = await self.store.save(runtime, saga_id, 0, record, as_events(outs, saga_id, record.correlation))
            if ACTIVE:
                await hit("saga.after_state_write", name)
            if status is CommitStatus.OK:
                for sid, line in lines:
                    self._trace(sid, line)
                current = to_result(definition, record)
            else:
                log.info("[SAGA-%s] already exists; not starting it again", saga_id)
                current = await self.get_saga_state(saga_id)
            if not wait or current.state.terminal:
                return current
            assert future is not None
            return await self._waiters.wait(saga_id, future, timeout, self.poll_interval)
        finally:
            self._waiters.discard(saga_id, future)

    async def get_saga_state(self, saga_id: str) -> SagaResult:
        """The saga as stored now.

        Raises:
            SagaNotFound: no such saga (or it ended with ``persistence=False``).
            ChoreoError: the app is not running.
        """
        stored = await self.store.load(saga_id, self._runtime())
        if stored is None:
            raise SagaNotFound(f"no saga {saga_id!r}")
        return to_result(self.definitions.get(stored.record.name), stored.record)

    async def list_sagas(self, state: SagaState | str | None = None) -> list[SagaResult]:
        """Stored sagas (of every coordinator sharing the store), oldest first; in ``state`` if given.

        Raises:
            ConfigurationError: an unknown state name (a ``ValueError`` too).
        """
        records = await self.store.records(parse_state(state), self._runtime())
        return [to_result(self.definitions.get(record.name), record) for record in records]

    async def resume_saga(self, saga_id: str, *, wait: bool = True, timeout: float | None = None) -> SagaResult:
        """Continue a saga from its stored state: resend the command it waits
        for, or (for a FAILED saga) retry the compensations that failed.

        Raises:
            SagaNotFound: no such saga.
            ConfigurationError: the saga is not defined on this coordinator.
            TimeoutError: still running after ``timeout`` seconds.
        """
        runtime = self._runtime()
        future = self._waiters.add(saga_id) if wait else None
        try:
            for _ in range(MAX_CONFLICTS):
                stored = await self.store.load(saga_id, runtime)
                if stored is None:
                    raise SagaNotFound(f"no saga {saga_id!r}")
                record = stored.record
                self.definition(record.name)  # the saga must be defined here, in some version
                found = self.versions.get(record.name, record.version)
                if found is None:
                    version_missing(self.versions, runtime, record, "resume")
                    return to_result(None, record)
                definition = found
                outs = SagaRun(definition, record, time.time(), self._trace, self._detail).resume()
                if not outs:
                    return to_result(definition, record)
                if ACTIVE:
                    await hit("saga.before_state_write", definition.name)
                events = as_events(outs, saga_id, record.correlation)
                status = await self.store.save(runtime, saga_id, stored.version, record, events)
                if ACTIVE:
                    await hit("saga.after_state_write", definition.name)
                if status is CommitStatus.OK:
                    break
            else:
                raise ChoreoError(f"saga {saga_id!r} kept changing while resuming it")
            if not wait:
                return to_result(definition, record)
            assert future is not None
            return await self._waiters.wait(saga_id, future, timeout, self.poll_interval)
        finally:
            self._waiters.discard(saga_id, future)

    async def sweep(self) -> int:
        """Fire the timer of every saga whose step or deadline is overdue by
        more than ``sweep_interval`` (its delayed event was lost). Harmless
        if the timer does fire: the first one wins. Returns how many fired."""
        return await sweeper.sweep(self._runtime(), self.versions, self.store, self.sweep_interval or 0.0)

    # -- internals -----------------------------------------------------------------

    async def _transition(
        self, name: str, event: Event, ctx: Context, step: Callable[[SagaRun], list[Out]]
    ) -> list[Emit]:
        if not event.saga_id:
            log.warning("ignoring %s %s: it names no saga", event.type, event.id)
            return []
        for _ in range(MAX_CONFLICTS):
            if (emits := await self._transition_once(name, event, ctx, step, event.saga_id)) is not None:
                return emits
        raise ChoreoError(f"saga {event.saga_id!r} kept changing under {event.type} {event.id}")

    async def _transition_once(
        self, name: str, event: Event, ctx: Context, step: Callable[[SagaRun], list[Out]], saga_id: str
    ) -> list[Emit] | None:
        runtime = self._runtime()
        stored = await self.store.load_in(ctx, saga_id)
        if stored is None:
            log.warning("[SAGA-%s] ignoring %s for an unknown saga", saga_id, event.type)
            SagaMetrics.count_ignored(runtime.middleware, name, "unknown_saga")
            return []
        record = stored.record
        definition = self.versions.get(name, record.version)
        if definition is None:
            # Left as it is: the timer (or sweeper) of a coordinator defining the
            # version moves it on (a lost reply is a timed-out attempt).
            version_missing(self.versions, runtime, record, event.type)
            return []
        # The machine says whether anything changed, so a stale reply writes nothing.
        run = SagaRun(definition, record, time.time(), self._trace, self._detail)
        outs = step(run)
        if run.ignored is not None:
            SagaMetrics.count_ignored(runtime.middleware, name, run.ignored)
        if not run.changed and not outs:
            return []
        if self.debug:
            log.info("[SAGA-%s]   data: %s", saga_id, json.dumps(record.data, default=str)[:2000])
        kept = record if self.persistence or not run.state.terminal else None
        return await self.store.save_in(ctx, saga_id, stored.version, kept, outs)

    def _trace(self, saga_id: str, line: str) -> None:
        log.info("[SAGA-%s] %s", saga_id, line)

    def _detail(self, saga_id: str, line: str) -> None:
        if self.trace_enabled:
            log.info("[SAGA-%s]   %s", saga_id, line)

    def _runtime(self) -> Running:
        """The runtime running the app (``ChoreoError`` if none does)."""
        if not self._runtimes:
            raise ChoreoError(f"app {self.app.name!r} is not running; start it with `async with choreo.run(app):`")
        return self._runtimes[-1]

    @contextlib.asynccontextmanager
    async def _lifespan(self, runtime: Running) -> AsyncIterator[None]:
        """While ``runtime`` runs the app: its store connected, waiters woken,
        overdue sagas swept."""
        async with self.store.lifespan(runtime):
            runtime.add_middleware(self._waiters)
            for metrics in SagaMetrics.missing(runtime.middleware):
                runtime.add_middleware(metrics)
            if self.sweep_interval is not None:
                runtime.start_task(sweeper.sweep_every(self.sweep_interval, self.sweep), name="choreo-saga-sweeper")
            self._runtimes.append(runtime)
            try:
                yield
            finally:
                self._runtimes.remove(runtime)
