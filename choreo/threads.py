"""Threads for sync handlers that never keep a stopping worker alive.

``asyncio.to_thread`` runs on the loop's default executor, whose threads the
interpreter joins at exit: a sync handler still sleeping after the drain grace
period would hold ``choreo worker`` open long after SIGTERM, though its
delivery was already given up (it stays unacked and is redelivered). A daemon
thread per call lets the process exit when the drain says so; starting one
costs tens of microseconds, small beside what a sync handler does.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
from collections.abc import Callable
from typing import Any

__all__ = ("run_in_daemon_thread",)


async def run_in_daemon_thread(function: Callable[..., Any], /, **kwargs: Any) -> Any:
    """Call ``function(**kwargs)`` in a new daemon thread with the caller's
    context variables; cancelling the caller abandons the thread."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()
    context = contextvars.copy_context()

    def settle(outcome: Any, failed: bool) -> None:
        if future.done():  # the caller was cancelled or timed out
            return
        if failed:
            future.set_exception(outcome)
        else:
            future.set_result(outcome)

    def work() -> None:
        try:
            outcome, failed = context.run(function, **kwargs), False
        except BaseException as exc:  # handed to the awaiting task, whatever it is
            outcome, failed = exc, True
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(settle, outcome, failed)

    threading.Thread(target=work, name=f"choreo-{getattr(function, '__name__', 'handler')}", daemon=True).start()
    return await future
