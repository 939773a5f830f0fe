"""The chain on FastStream's Redis Streams broker:

    BENCH_REDIS_URL=redis://... faststream run bench.peer_apps.faststream_app:app

Each hop is a subscriber on a consumer group with a publisher decorator, so the
returned value is published to the next stream (FastStream's documented way
to chain handlers). A consumer group, not a plain ``XREAD``, because choreo and
the raw loop acknowledge each entry; everything else is FastStream's default
(one process, ``XREADGROUP`` without ``COUNT``, 100 ms polling, ack after the
handler returns, each message logged as received and as processed at INFO).
With ``BENCH_QUIET`` set (``bench/peers.py --quiet-peers``) the broker logs
them at DEBUG, below the logger's level, as FastStream's docs show for
silencing them. bench.d has no subscriber: ``bench/peers.py`` counts it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from faststream import FastStream
from faststream.redis import RedisBroker, StreamSub

broker = RedisBroker(
    os.environ.get("BENCH_REDIS_URL", "redis://localhost:6379"),
    log_level=logging.DEBUG if os.environ.get("BENCH_QUIET") else logging.INFO,
)
app = FastStream(broker)


def stream(name: str) -> StreamSub:
    return StreamSub(name, group="bench", consumer="worker")


@broker.subscriber(stream=stream("bench.a"))
@broker.publisher(stream="bench.b")
async def a_to_b(data: dict[str, Any]) -> dict[str, Any]:
    return data


@broker.subscriber(stream=stream("bench.b"))
@broker.publisher(stream="bench.c")
async def b_to_c(data: dict[str, Any]) -> dict[str, Any]:
    return data


@broker.subscriber(stream=stream("bench.c"))
@broker.publisher(stream="bench.d")
async def c_to_d(data: dict[str, Any]) -> dict[str, Any]:
    return data


async def publish(payloads: list[list[dict[str, Any]]]) -> None:
    """One task per list, each awaiting ``broker.publish`` one event at a time."""
    await broker.connect()

    async def send(batch: list[dict[str, Any]]) -> None:
        for data in batch:
            await broker.publish(data, stream="bench.a")

    await asyncio.gather(*(send(batch) for batch in payloads))
    await broker.stop()
