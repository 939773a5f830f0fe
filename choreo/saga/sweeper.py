"""The sweeper: a saga whose timer was lost still moves on.

A step's timeout and a saga's deadline are delayed events; a delayed event
can be lost (a Redis restart without AOF, a purge). Every ``sweep_interval``
the coordinator's runtime fires the timer of each saga overdue by more than
that interval. Harmless when the timer does fire: the first one wins, the
other is stale (its token no longer matches).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from choreo.lifecycle import Running
from choreo.saga.stores import SagaStateStore
from choreo.saga.topics import timeout_topic
from choreo.saga.versions import SagaVersions

__all__ = ("sweep", "sweep_every")

log = logging.getLogger("choreo.saga")


async def sweep(runtime: Running, versions: SagaVersions, store: SagaStateStore, grace: float) -> int:
    """Fire the timer of every saga defined in ``versions`` whose step or
    deadline is overdue by more than ``grace`` seconds; return how many."""
    now = time.time()
    fired = 0
    for record in await store.overdue(now, grace, runtime):
        if versions.get(record.name, record.version) is None:
            continue  # not ours, or a version no longer defined here (choreo check lists those)
        kind = None
        if record.deadline_at is not None and now > record.deadline_at + grace:
            kind = "deadline"
        elif record.due_at is not None and now > record.due_at + grace:
            kind = "sweep"
        if kind is None:
            continue
        log.warning("[SAGA-%s] overdue (%s); firing its timer", record.saga_id, kind)
        data = {"saga": record.name, "kind": kind, "token": record.token, "step": None}
        await runtime.publish(
            timeout_topic(record.name), data, saga_id=record.saga_id, correlation_id=record.correlation
        )
        fired += 1
    return fired


async def sweep_every(interval: float, sweep_once: Callable[[], Awaitable[int]]) -> None:
    """Call ``sweep_once`` every ``interval`` seconds until cancelled; a
    failed sweep is logged and tried again next time."""
    while True:
        await asyncio.sleep(interval)
        try:
            await sweep_once()
        except Exception as exc:
            log.warning("saga sweep failed, trying again in %ss: %s", interval, exc)
