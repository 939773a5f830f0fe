"""Saga throughput: a 5-step saga, 200 running at once, on memory and on Redis.

    python bench/saga_throughput.py [--sagas 2000] [--concurrency 200] [--broker memory|redis|both]

Each saga is five steps on five participant services, all in this process
(one coordinator, one worker runtime). A pool of ``--concurrency`` callers
each starts a saga and waits for its end, then starts the next. Reports
sagas/s over the whole run and p50/p99 latency from ``start_saga`` to the
saga's end. For Redis it starts its own redis-server on a free port (no
persistence, so disk speed does not enter).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from choreo import App, SagaCoordinator, SagaState, SagaStep, run
from choreo.supervisor import WORKER_GC_THRESHOLD, tune_collector

STEPS = 5


async def do(saga_id: str) -> dict[str, Any]:
    return {"last": saga_id}


async def undo() -> None:
    return None


def build() -> tuple[SagaCoordinator, list[App]]:
    orders = App("bench_orders")
    coordinator = SagaCoordinator(orders)
    services = [App(f"bench_service_{i}") for i in range(STEPS)]
    coordinator.define_saga(
        "bench",
        [SagaStep(f"step{i}", s.name, "do", "undo", timeout=60.0) for i, s in enumerate(services)],
    )
    for service in services:
        service.action("do")(do)
        service.action("undo")(undo)
    return coordinator, [orders, *services]


async def bench(url: str, sagas: int, concurrency: int) -> dict[str, float]:
    coordinator, apps = build()
    latencies: list[float] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(sagas):
        queue.put_nowait(i)

    async def caller() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            started = time.perf_counter()
            result = await coordinator.start_saga("bench", {"n": i}, timeout=120)
            latencies.append(time.perf_counter() - started)
            assert result.state is SagaState.COMPLETED

    async with run(*apps, broker=url, concurrency=max(64, concurrency * 2)):
        started = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "sagas_per_s": sagas / elapsed,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
        "elapsed_s": elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sagas", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--broker", choices=("memory", "redis", "both"), default="both")
    parser.add_argument("--gc-threshold", type=int, default=WORKER_GC_THRESHOLD,
                        help="collector threshold, as choreo worker sets it (0: Python's default), for both sides")
    args = parser.parse_args()
    tune_collector(args.gc_threshold)
    logging.basicConfig(level=logging.WARNING)
    kinds = ["memory", "redis"] if args.broker == "both" else [args.broker]
    for kind in kinds:
        server = None
        url = "memory://"
        if kind == "redis":
            from tests.redis_server import RedisServer

            server = RedisServer()
            server.start()
            url = server.url
        try:
            figures = asyncio.run(bench(url, args.sagas, args.concurrency))
        finally:
            if server is not None:
                server.stop()
        print(
            f"{kind:<6} {args.sagas} sagas x {STEPS} steps, {args.concurrency} concurrent: "
            f"{figures['sagas_per_s']:.0f} sagas/s, p50 {figures['p50_ms']:.1f} ms, p99 {figures['p99_ms']:.1f} ms "
            f"({figures['elapsed_s']:.1f} s)"
        )


if __name__ == "__main__":
    main()
