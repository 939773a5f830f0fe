"""Waiting for sagas to end: ``start_saga(wait=True)`` and ``resume_saga``.

A saga that ends in this process wakes its waiters at once, from the
coordinator's middleware seeing the final lifecycle event published. A saga
that another coordinator process runs ends without this process publishing
anything, so waiters also read the saga's record now and then.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from choreo.events import Event
from choreo.middleware import Middleware
from choreo.saga.definition import SagaNotFound, SagaResult
from choreo.saga.record import result_of_lifecycle
from choreo.saga.topics import ENDS, parse_lifecycle

__all__ = ("SagaWaiters",)


class SagaWaiters(Middleware):
    """The callers waiting for sagas of one coordinator to end.

    Args:
        read: Reads a saga's stored state (``SagaCoordinator.get_saga_state``).
    """

    def __init__(
        self,
        read: Callable[[str], Awaitable[SagaResult]],
    ) -> None:
        self._read = read
        #: Saga id -> the futures of its waiters in this process.
        self.futures: dict[str, list[asyncio.Future[SagaResult]]] = {}

    def on_publish(self, event: Event) -> None:
        if event.saga_id is None or event.saga_id not in self.futures:
            return
        lifecycle = parse_lifecycle(event.type)
        if lifecycle is None or lifecycle[1] not in ENDS or event.data.get("saga") != lifecycle[0]:
            return
        result = result_of_lifecycle(event.saga_id, event.data)
        for future in self.futures.pop(event.saga_id, []):
            if not future.done():
                future.set_result(result)

    def add(self, saga_id: str) -> asyncio.Future[SagaResult]:
        """A future that gets the saga's result when this process ends it."""
        future: asyncio.Future[SagaResult] = asyncio.get_running_loop().create_future()
        self.futures.setdefault(saga_id, []).append(future)
        return future

    def discard(self, saga_id: str, future: asyncio.Future[SagaResult] | None) -> None:
        """Stop waiting with ``future`` (``None``: nothing to do)."""
        waiting = self.futures.get(saga_id)
        if future is not None and waiting and future in waiting:
            waiting.remove(future)
            if not waiting:
                del self.futures[saga_id]

    async def wait(
        self, saga_id: str, future: asyncio.Future[SagaResult], timeout: float | None, poll: float
    ) -> SagaResult:
        """The saga's result once it ends, here or in another process (whose
        end is noticed by reading its state every ``poll`` seconds).

        Raises:
            TimeoutError: it has not ended within ``timeout`` seconds (it goes on).
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        # The in-process future wakes us at once; polling only covers sagas
        # that another coordinator process ends, so it can be unhurried.
        while True:
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                raise TimeoutError(f"saga {saga_id} has not ended after {timeout}s; it goes on")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(poll if left is None else min(poll, left)):
                    return await asyncio.shield(future)
            with contextlib.suppress(SagaNotFound):
                current = await self._read(saga_id)
                if current.state.terminal:
                    return current
