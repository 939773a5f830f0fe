"""Throughput of a 3-hop chain (A -> B -> C -> D) on the in-memory broker,
against a plain asyncio baseline measured in the same run.

    python bench/chain_memory.py [--events 100000]

The baseline is the least a framework could do: a dict routing table, one
asyncio.Queue, JSON encode and decode per hop. Both figures count handled
events per second (three per chain); the ratio is what to compare across
machines.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import time
from typing import Any

from choreo import App
from choreo.supervisor import WORKER_GC_THRESHOLD, tune_collector
from choreo.testing import run_apps


def chain_app() -> App:
    app = App("chain")

    @app.on_event("bench.a")
    @app.emits("bench.b")
    async def a_to_b(data: dict[str, Any]) -> None: ...

    @app.on_event("bench.b")
    @app.emits("bench.c")
    async def b_to_c(data: dict[str, Any]) -> None: ...

    @app.on_event("bench.c")
    @app.emits("bench.d")
    async def c_to_d(data: dict[str, Any]) -> None: ...

    return app


async def run_choreo(events: int) -> float:
    async with run_apps(chain_app(), broker="memory://") as env:
        start = time.perf_counter()
        for n in range(events):
            await env.publish("bench.a", {"n": n, "payload": "x" * 40})
        await env.settle(timeout=3600)
        elapsed = time.perf_counter() - start
        assert len(env.published("bench.d")) == events
    return events * 3 / elapsed


async def run_baseline(events: int) -> float:
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    done = 0
    finished = asyncio.Event()

    async def a_to_b(data: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return "bench.b", data

    async def b_to_c(data: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return "bench.c", data

    async def c_to_d(data: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return "bench.d", data

    routes = {"bench.a": a_to_b, "bench.b": b_to_c, "bench.c": c_to_d}

    async def worker() -> None:
        nonlocal done
        while True:
            message = json.loads(await queue.get())
            handler = routes.get(message["type"])
            if handler is None:
                done += 1
                if done == events:
                    finished.set()
                continue
            event_type, data = await handler(message["data"])
            queue.put_nowait(json.dumps({"type": event_type, "data": data}).encode())

    task = asyncio.create_task(worker())
    start = time.perf_counter()
    for n in range(events):
        queue.put_nowait(json.dumps({"type": "bench.a", "data": {"n": n, "payload": "x" * 40}}).encode())
        if n % 1000 == 0:
            await asyncio.sleep(0)
    await finished.wait()
    elapsed = time.perf_counter() - start
    task.cancel()
    return events * 3 / elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000, help="root events (each makes three hops)")
    parser.add_argument("--gc-threshold", type=int, default=WORKER_GC_THRESHOLD,
                        help="collector threshold, as choreo worker sets it (0: Python's default), for both sides")
    args = parser.parse_args()
    tune_collector(args.gc_threshold)
    baseline = await run_baseline(args.events)
    choreo_rate = await run_choreo(args.events)
    print(f"chains: {args.events:,} (3 hops each); gc threshold {gc.get_threshold()[0]}")
    print(f"baseline asyncio.Queue + json: {baseline:,.0f} events/s")
    print(f"choreo run_apps on memory://:  {choreo_rate:,.0f} events/s")
    print(f"ratio choreo/baseline: {choreo_rate / baseline:.2f} (target >= 0.30)")


if __name__ == "__main__":
    asyncio.run(main())
