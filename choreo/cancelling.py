"""Cancelling tasks so that they really end.

One ``task.cancel()`` is not always enough on Python 3.11: ``asyncio.wait_for``
(which redis-py uses for its socket timeouts) returns the inner call's result
and drops the cancellation when both arrive in the same loop iteration. A loop
such as lease renewal then goes on as if nothing happened, and a worker that
waits for it never exits. Measured against redis-py 8.1 on a BlockingConnectionPool:
about one cancel in ten, landed at a random moment in a loop of script calls,
was swallowed this way. ``cancel_and_wait`` cancels again until the task ends.

anyio's level-triggered cancel scopes do the same thing (on asyncio a
cancelled scope calls ``task.cancel()`` again every loop iteration until the
task leaves it), but only for code that runs inside a scope. The tasks
cancelled here are plain asyncio tasks; putting each handling in a scope costs
4.8 µs per enter and exit around an await (2.1 -> 6.9 µs, best of three
loops of 100,000 on a 2-core machine), a task group 29 µs instead of 7 µs
for a bare task: a sixth of a handled event's 28 µs on
``bench/chain_memory.py``. So choreo does not use anyio; these lines do.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

__all__ = ("cancel_and_wait",)

#: Seconds between cancellations of a task that goes on: long enough for a
#: handler's own clean-up on cancellation, short beside the stop timeouts.
_RECANCEL_EVERY = 0.5


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]], timeout: float) -> set[asyncio.Task[Any]]:
    """Cancel ``tasks`` and wait up to ``timeout`` seconds for them to end,
    cancelling again any that go on; return those still running at the end."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    tasks = set(tasks)
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        left = deadline - loop.time()
        if left <= 0:
            break
        _, pending = await asyncio.wait(pending, timeout=min(_RECANCEL_EVERY, left))
    for task in tasks - pending:
        if not task.cancelled():
            task.exception()  # ended on its own with an error: the caller chose not to hear it
    return pending
