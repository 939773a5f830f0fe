"""Throughput of a 3-hop chain (A -> B -> C -> D) on the in-memory broker,
against a plain asyncio baseline measured in the same run.

    python bench/chain_memory.py [--events 100000] [--repeat 3]

Three contenders, each fed the same root events one ``publish`` at a time:

* baseline: the least a framework could do: a dict routing table, one
  asyncio.Queue, JSON encode and decode per hop;
* production path: ``choreo.run`` on ``memory://``, what ``choreo worker``
  runs (no middleware);
* test harness: ``choreo.testing.run_apps``, which also records every
  published event for the test to look at, and waits with ``settle``.

Each counts handled events per second (three per chain) and process CPU time
per handled event; the ratios against the baseline are what to compare
across machines. With ``--repeat`` the contenders alternate and the medians
are reported.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

from choreo import App, run
from choreo.supervisor import WORKER_GC_THRESHOLD, tune_collector
from choreo.testing import run_apps
from choreo.worker import Runtime


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


async def run_harness(events: int) -> float:
    """The test harness: ``run_apps``, recording every published event."""
    async with run_apps(chain_app(), broker="memory://") as env:
        start = time.perf_counter()
        for n in range(events):
            await env.publish("bench.a", {"n": n, "payload": "x" * 40})
        await env.settle(timeout=3600)
        elapsed = time.perf_counter() - start
        assert len(env.published("bench.d")) == events
    return events * 3 / elapsed


async def run_production(events: int) -> float:
    """The production path: ``choreo.run``, as ``choreo worker`` runs apps."""
    async with run(chain_app(), broker="memory://") as runtime:
        start = time.perf_counter()
        for n in range(events):
            await runtime.publish("bench.a", {"n": n, "payload": "x" * 40})
        await quiet(runtime)
        elapsed = time.perf_counter() - start
        [backlog] = [b for b in await runtime.broker.backlog(runtime.subscriptions) if b.topic == "bench.c"]
        assert backlog.idle
    return events * 3 / elapsed


async def quiet(runtime: Runtime) -> None:
    """Wait until nothing is ready, pending or in flight (``settle`` without its record)."""
    while True:
        backlog = await runtime.broker.backlog(runtime.subscriptions)
        if runtime.in_flight == 0 and all(b.idle for b in backlog):
            return
        await asyncio.sleep(0.005)


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
    parser.add_argument("--repeat", type=int, default=1, help="rounds, contenders alternating; medians reported")
    args = parser.parse_args()
    tune_collector(args.gc_threshold)
    contenders: dict[str, Callable[[int], Awaitable[float]]] = {
        "baseline asyncio.Queue + json": run_baseline,
        "production path (choreo.run)": run_production,
        "test harness (run_apps)": run_harness,
    }
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    cpu: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.repeat):
        for name, contender in contenders.items():
            used = time.process_time()
            rates[name].append(await contender(args.events))
            cpu[name].append((time.process_time() - used) / (args.events * 3) * 1e6)
    print(f"chains: {args.events:,} (3 hops each); gc threshold {gc.get_threshold()[0]}; "
          f"{args.repeat} round(s), medians")
    baseline = statistics.median(rates["baseline asyncio.Queue + json"])
    baseline_cpu = statistics.median(cpu["baseline asyncio.Queue + json"])
    for name in contenders:
        rate, used = statistics.median(rates[name]), statistics.median(cpu[name])
        print(f"{name + ':':<31} {rate:>8,.0f} events/s ({rate / baseline:.2f} of the baseline), "
              f"CPU {used:.1f} us per event ({used / baseline_cpu:.2f}x); per round: "
              + " / ".join(f"{r:,.0f}" for r in rates[name]))
    print("target: the test harness >= 0.30 of the baseline")


if __name__ == "__main__":
    asyncio.run(main())
