"""The chain on Dramatiq's Redis broker:

    BENCH_REDIS_URL=redis://... dramatiq bench.peer_apps.dramatiq_app --queues bench.a bench.b bench.c

Each hop is an actor on a queue of its own that sends the next actor its
message. The worker runs at Dramatiq's defaults (one process per CPU, 8
threads each, prefetch twice the threads, the default middleware);
``--queues`` only leaves bench.d unconsumed, so ``bench/peers.py`` can count
it.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dramatiq
from dramatiq.brokers.redis import RedisBroker

broker = RedisBroker(url=os.environ.get("BENCH_REDIS_URL", "redis://localhost:6379"))
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name="bench.a")
def a_to_b(data: dict[str, Any]) -> None:
    b_to_c.send(data)


@dramatiq.actor(queue_name="bench.b")
def b_to_c(data: dict[str, Any]) -> None:
    c_to_d.send(data)


@dramatiq.actor(queue_name="bench.c")
def c_to_d(data: dict[str, Any]) -> None:
    d.send(data)


@dramatiq.actor(queue_name="bench.d")
def d(data: dict[str, Any]) -> None:
    """The chain's end; no worker listens to bench.d in the benchmark."""


def publish(payloads: list[list[dict[str, Any]]]) -> None:
    """One thread per list (``send`` blocks), each sending one message at a time."""

    def send(batch: list[dict[str, Any]]) -> None:
        for data in batch:
            a_to_b.send(data)

    with ThreadPoolExecutor(max_workers=len(payloads)) as pool:
        list(pool.map(send, payloads))
