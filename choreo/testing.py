"""Testing support shipped as a feature: run real apps on a real broker.

``run_apps`` runs apps on the in-memory broker (which round-trips every message
through the wire format) or on Redis, publishes, waits until the system is
quiet, and shows what was published and dead-lettered.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from brokers import Broker
from choreo.dead_letters import DeadLetter
from choreo.events import Event
from choreo.lifecycle import OUTBOX_RELAYS
from choreo.middleware import Middleware
from choreo.options import RuntimeOptions
from choreo.saga.harness import SagaTestHarness
from choreo.worker import Runtime, run

if TYPE_CHECKING:
    from choreo.app import App

__all__ = ("SagaTestHarness", "TestEnv", "run_apps")


class _Recorder(Middleware):
    def __init__(self) -> None:
        self.events: list[Event] = []

    def on_publish(self, event: Event) -> None:
        self.events.append(event)


class TestEnv:
    """What ``run_apps`` yields: publish, settle, then look."""

    __test__ = False  # not a pytest test class

    def __init__(self, runtime: Runtime, recorder: _Recorder) -> None:
        self.runtime = runtime
        self._recorder = recorder
        self._published: list[Event] = []
        self._dead: list[DeadLetter] = []

    @property
    def broker(self) -> Broker:
        return self.runtime.broker

    async def publish(self, type: str, data: dict[str, Any] | None = None, **kwargs: Any) -> Event:
        """Publish a root event (same arguments as ``App.publish``)."""
        return await self.runtime.publish(type, data, **kwargs)

    async def settle(self, timeout: float = 5.0) -> None:
        """Wait until these apps' groups are quiet: nothing ready, in flight,
        pending or delayed. Then snapshot ``published`` and ``dead_letters``.

        Raises:
            TimeoutError: still busy after ``timeout`` seconds (naming what is busy).
        """
        deadline = time.monotonic() + timeout
        busy: list[str] = []
        while True:
            busy = await self._busy()
            if not busy:
                # Twice in a row, so that a commit racing the first look is seen.
                await asyncio.sleep(0.005)
                busy = await self._busy()
                if not busy:
                    break
            if time.monotonic() >= deadline:
                raise TimeoutError(f"not settled after {timeout}s: {', '.join(busy[:5])}")
            await asyncio.sleep(0.01)
        self._published = list(self._recorder.events)
        self._dead = [DeadLetter.from_record(r) for r in await self.broker.dead_letters()]

    async def _busy(self) -> list[str]:
        busy = [
            f"{b.group} on {b.topic} (ready {b.ready}, pending {b.pending}, delayed {b.delayed})"
            for b in await self.broker.backlog(self.runtime.subscriptions)
            if not b.idle
        ]
        if self.runtime.in_flight:
            busy.append(f"{self.runtime.in_flight} handlers running")
        if any(relay.pending for relay in self.runtime.extensions.get(OUTBOX_RELAYS, ())):
            busy.append("events committed to a database's outbox, not yet relayed")
        return busy

    def published(self, type: str | None = None) -> list[Event]:
        """Events published (root and emitted) up to the last ``settle``, in
        publish order; only those of ``type`` if given."""
        return [e for e in self._published if type is None or e.type == type]

    def dead_letters(self) -> list[DeadLetter]:
        """Dead letters as of the last ``settle``."""
        return list(self._dead)


@contextlib.asynccontextmanager
async def run_apps(
    *apps: App, broker: str | Broker = "memory://", options: RuntimeOptions | None = None, **overrides: Any
) -> AsyncIterator[TestEnv]:
    """Run ``apps`` on ``broker`` for a test; with no apps, a plain publisher.

    Options are those of ``choreo.run`` (``concurrency``, ``grace``...), as
    a ``RuntimeOptions`` record, keywords, or both.
    """
    recorder = _Recorder()
    settings = RuntimeOptions.of(options, **overrides).with_middleware([recorder])
    async with run(*apps, broker=broker, options=settings) as runtime:
        yield TestEnv(runtime, recorder)
