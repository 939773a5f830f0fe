"""``SagaTestHarness``: run sagas in a test, in memory, on a virtual clock.

The harness runs the given apps on an in-memory broker whose clock it owns:
whenever no handler is running and nothing is ready to deliver, the clock
jumps to the next delayed message (a retry backoff, a step timeout), so a saga
with minute-long waits runs in milliseconds. Handler ``timeout``s stay on
real time. Actions that no given app implements are stubbed (they succeed and
return ``{}``), and any action can be told to fail.

The clock driver and the action interceptor (which records calls and injects
failures) are installed by a lifespan hook of the harness's runtime, so they
stop with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

from brokers.memory import MemoryBroker
from choreo.actions import ACTION_INTERCEPTOR, command_topic
from choreo.app import App
from choreo.events import Event
from choreo.lifecycle import Running
from choreo.middleware import Middleware
from choreo.options import RuntimeOptions
from choreo.saga import defined
from choreo.saga.coordinator import SagaCoordinator, coordinator_of
from choreo.saga.definition import SagaResult
from choreo.worker import Runtime

__all__ = ("SagaTestHarness",)

ErrorSpec = BaseException | type[BaseException] | str


class _Recorder(Middleware):
    def __init__(self) -> None:
        self.events: list[Event] = []

    def on_publish(self, event: Event) -> None:
        self.events.append(event)


class _Failure:
    def __init__(self, times: int | None, error: ErrorSpec, where: str) -> None:
        self.left = times
        self.error = error
        self.where = where

    def take(self) -> BaseException | None:
        if self.left is not None:
            if self.left <= 0:
                return None
            self.left -= 1
        if isinstance(self.error, BaseException):
            return self.error
        if isinstance(self.error, type):
            return self.error(f"configured failure of {self.where}")
        return RuntimeError(self.error)


class SagaTestHarness:
    """Run apps (one holding a ``SagaCoordinator``) on a virtual clock.

    Works with no setup (the first ``start_saga`` starts it) and as
    ``async with``; ``close()`` (or leaving the block) stops everything it
    started. Pass apps or coordinators; with none, it runs the coordinators
    of the apps defined so far (the newest one per service and saga name).

    Example::

        harness = SagaTestHarness(orders, payments)
        harness.configure_failure("payment_service", "charge_card", times=2)
        result = await harness.start_saga("order_processing", {"total": 10})
        assert result.state is SagaState.COMPLETED
        assert len(harness.calls("payment_service", "charge_card")) == 3
    """

    __test__ = False  # not a pytest test class

    def __init__(self, *apps: App | SagaCoordinator, concurrency: int = 64) -> None:
        if not apps:
            apps = tuple(_defined_so_far())
        self.apps = [a.app if isinstance(a, SagaCoordinator) else a for a in apps]
        self.coordinators = [c for c in (coordinator_of(a) for a in self.apps) if c is not None]
        self.concurrency = concurrency
        self._offset = 0.0
        self.broker = MemoryBroker(clock=self.clock)
        self._failures: dict[tuple[str, str], _Failure] = {}
        self._calls: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self._recorder = _Recorder()
        self._runtime: Runtime | None = None
        self._starting: asyncio.Lock | None = None

    # -- clock -------------------------------------------------------------------

    def clock(self) -> float:
        """The virtual clock: real monotonic time plus every jump made so far."""
        return time.monotonic() + self._offset

    def advance(self, seconds: float) -> None:
        """Move the virtual clock forward by ``seconds``."""
        self._offset += seconds
        self.broker.poke()

    # -- lifecycle ---------------------------------------------------------------

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            raise RuntimeError("the harness is not running; call start_saga or use `async with`")
        return self._runtime

    async def start(self) -> None:
        """Start the apps and the clock (done lazily by ``start_saga``). Idempotent."""
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._runtime is not None:
                return
            options = RuntimeOptions(
                concurrency=self.concurrency,
                grace=1.0,
                middleware=[self._recorder],
                poll_interval=0.05,
                lifespan=[self._lifespan],
            )
            runtime = Runtime([*self.apps, *self._stub_apps()], self.broker, options)
            await runtime.start()
            self._runtime = runtime

    async def close(self) -> None:
        """Stop the apps and the clock. Idempotent."""
        if self._runtime is not None:
            runtime, self._runtime = self._runtime, None
            await runtime.stop()
            await self.broker.close()

    @contextlib.asynccontextmanager
    async def _lifespan(self, runtime: Running) -> AsyncIterator[None]:
        runtime.extensions[ACTION_INTERCEPTOR] = self._intercept
        runtime.start_task(self._drive_clock(runtime), name="choreo-virtual-clock")
        yield

    async def __aenter__(self) -> SagaTestHarness:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- sagas -------------------------------------------------------------------

    def coordinator(self, saga: str) -> SagaCoordinator:
        """The coordinator that defines ``saga``.

        Raises:
            LookupError: none of the given apps defines it.
        """
        for coordinator in self.coordinators:
            if saga in coordinator.definitions:
                return coordinator
        raise LookupError(f"no given app defines saga {saga!r}")

    async def start_saga(
        self, name: str, data: dict[str, Any] | None = None, *, timeout: float | None = 30.0, **options: Any
    ) -> SagaResult:
        """Start saga ``name`` and (by default) wait for its end; see
        ``SagaCoordinator.start_saga``. ``timeout`` is in real seconds."""
        await self.start()
        return await self.coordinator(name).start_saga(name, data, timeout=timeout, **options)

    async def get_saga_state(self, saga_id: str) -> SagaResult:
        """The stored state of a saga started here."""
        await self.start()
        for coordinator in self.coordinators:
            with contextlib.suppress(LookupError):
                return await coordinator.get_saga_state(saga_id)
        raise LookupError(f"no saga {saga_id!r}")

    async def resume_saga(self, saga_id: str, **options: Any) -> SagaResult:
        """Resume a saga (see ``SagaCoordinator.resume_saga``)."""
        result = await self.get_saga_state(saga_id)
        options.setdefault("timeout", 30.0)
        return await self.coordinator(result.name).resume_saga(saga_id, **options)

    async def publish(self, type: str, data: dict[str, Any] | None = None, **ids: Any) -> Event:
        """Publish a root event (for choreographed flows)."""
        await self.start()
        return await self.runtime.publish(type, data, **ids)

    async def run_until_idle(self, timeout: float = 10.0) -> None:
        """Wait (real seconds) until nothing is ready, running or delayed,
        the clock jumping over delays meanwhile.

        Raises:
            TimeoutError: still busy after ``timeout``.
        """
        await self.start()
        deadline = time.monotonic() + timeout
        while not (await self._quiet(self.runtime) and self.broker.next_due() is None):
            if time.monotonic() > deadline:
                raise TimeoutError(f"saga harness still busy after {timeout}s")
            await asyncio.sleep(0.002)

    # -- participants ------------------------------------------------------------

    def configure_failure(
        self, service: str, action: str, times: int | None = None, error: ErrorSpec = RuntimeError
    ) -> None:
        """Make ``service``'s ``action`` fail: the next ``times`` calls, or
        always (``None``). ``error`` is an exception, an exception class, or
        a message for a ``RuntimeError``."""
        self._failures[(service, action)] = _Failure(times, error, f"{service}.{action}")

    def was_called(self, service: str, action: str) -> bool:
        """Whether ``service``'s ``action`` ran at least once."""
        return bool(self._calls.get((service, action)))

    def calls(self, service: str, action: str) -> list[dict[str, Any]]:
        """The data each call of ``service``'s ``action`` received, in order."""
        return [dict(d) for d in self._calls.get((service, action), [])]

    def published(self, type: str | None = None) -> list[Event]:
        """Events published so far (all, or of ``type``), in publish order."""
        return [e for e in self._recorder.events if type is None or e.type == type]

    def _intercept(self, service: str, action: str, data: dict[str, Any]) -> None:
        self._calls.setdefault((service, action), []).append(data)
        failure = self._failures.get((service, action))
        error = failure.take() if failure is not None else None
        if error is not None:
            raise error

    def _stub_apps(self) -> list[App]:
        implemented = {route.event for app in self.apps for route in app.routes}
        names = {app.name for app in self.apps}
        stubs: dict[str, App] = {}
        for coordinator in self.coordinators:
            every_version = (d for name in coordinator.definitions for d in coordinator.versions.of(name))
            for definition in every_version:
                for step in definition.steps:
                    for action in step.actions():
                        topic = command_topic(step.service, action)
                        if topic in implemented:
                            continue
                        implemented.add(topic)
                        if step.service not in stubs:
                            name = step.service if step.service not in names else f"{step.service}-stubs"
                            stubs[step.service] = App(name)
                        stubs[step.service].router.action(action, service=step.service)(_stub)
        return list(stubs.values())

    # -- the virtual clock ---------------------------------------------------------

    async def _quiet(self, runtime: Running) -> bool:
        if runtime.in_flight:
            return False
        for backlog in await self.broker.backlog(runtime.subscriptions):
            if backlog.ready or backlog.pending:
                return False
        return not runtime.in_flight

    async def _drive_clock(self, runtime: Running) -> None:
        while True:
            await asyncio.sleep(0.001)
            due = self.broker.next_due()
            if due is None or not await self._quiet(runtime):
                continue
            await asyncio.sleep(0)  # let a commit racing the first look land
            if not await self._quiet(runtime):
                continue
            gap = due - self.clock()
            if gap > 0:
                self._offset += gap + 1e-6
            self.broker.poke()


async def _stub() -> dict[str, Any]:
    return {}


def _defined_so_far() -> list[SagaCoordinator]:
    """The coordinators of the apps defined so far, newest first, one per
    service name and saga name (the newest wins: a test module that defines
    ``App("orders")`` again replaces an older one)."""
    chosen: list[SagaCoordinator] = []
    services: set[str] = set()
    sagas: set[str] = set()
    for coordinator in defined.newest_first():
        assert isinstance(coordinator, SagaCoordinator)
        names = set(coordinator.definitions)
        if coordinator.app.name in services or names & sagas:
            continue
        chosen.append(coordinator)
        services.add(coordinator.app.name)
        sagas |= names
    return chosen
