"""The chain on taskiq with taskiq-redis's stream broker:

    BENCH_REDIS_URL=redis://... taskiq worker bench.peer_apps.taskiq_app:broker

Each hop is a task that kicks the next one. The worker runs at taskiq's
defaults (2 worker processes, 100 tasks in flight each, no prefetch limit)
and the broker at taskiq-redis's (one stream, ``XREADGROUP COUNT 100``,
ack when the task is done). The last hop kicks ``d`` onto a second stream,
bench.d, that no worker reads, so ``bench/peers.py`` can count it.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from taskiq import TaskiqEvents, TaskiqState
from taskiq_redis import RedisStreamBroker

URL = os.environ.get("BENCH_REDIS_URL", "redis://localhost:6379")
broker = RedisStreamBroker(URL)
ends = RedisStreamBroker(URL, queue_name="bench.d")


@broker.on_event(TaskiqEvents.WORKER_STARTUP)
async def start_ends(state: TaskiqState) -> None:
    await ends.startup()


@broker.on_event(TaskiqEvents.WORKER_SHUTDOWN)
async def stop_ends(state: TaskiqState) -> None:
    await ends.shutdown()


@broker.task
async def a_to_b(data: dict[str, Any]) -> None:
    await b_to_c.kiq(data)


@broker.task
async def b_to_c(data: dict[str, Any]) -> None:
    await c_to_d.kiq(data)


@broker.task
async def c_to_d(data: dict[str, Any]) -> None:
    await d.kicker().with_broker(ends).kiq(data)


@broker.task
async def d(data: dict[str, Any]) -> None:
    """The chain's end; no worker reads bench.d in the benchmark."""


async def publish(payloads: list[list[dict[str, Any]]]) -> None:
    """One task per list, each awaiting ``kiq`` one event at a time."""
    await broker.startup()

    async def send(batch: list[dict[str, Any]]) -> None:
        for data in batch:
            await a_to_b.kiq(data)

    await asyncio.gather(*(send(batch) for batch in payloads))
    await broker.shutdown()
