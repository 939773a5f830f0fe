"""Saga throughput: a 5-step saga, 200 running at once, on memory and on Redis.

    python bench/saga_throughput.py [--sagas 2000] [--concurrency 200] [--broker memory|redis|both]
                                    [--shape sequential|parallel|both] [--state broker|postgres]

Each saga is five steps on five participant services, all in this process
(one coordinator, one worker runtime): one after the other (``sequential``),
or the middle three as one ``Parallel`` group (``parallel``). A pool of
``--concurrency`` callers each starts a saga and waits for its end, then
starts the next. Reports sagas/s over the whole run, p50/p99 latency from
``start_saga`` to the saga's end, this process's CPU time per saga and, on
Redis, commands per saga. For Redis it starts its own redis-server on a free
port (no persistence, so disk speed does not enter).

``--state postgres`` runs each case twice in the same run: saga state in the
broker (the default), then in PostgreSQL (``PostgresStateStore``, on a
private cluster this starts with initdb, fsync off, in a fresh database),
and reports PostgreSQL transactions per saga step: each is one round trip
(a transition is one statement, its read another), except a relay pass,
which is two round trips for a whole batch.
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

from choreo import App, Parallel, SagaCoordinator, SagaState, SagaStep, run
from choreo.supervisor import WORKER_GC_THRESHOLD, tune_collector

STEPS = 5


async def do(saga_id: str) -> dict[str, Any]:
    return {"last": saga_id}


async def undo() -> None:
    return None


def build(shape: str, state_store: Any = None) -> tuple[SagaCoordinator, list[App]]:
    orders = App("bench_orders")
    coordinator = SagaCoordinator(orders, state_store=state_store)
    services = [App(f"bench_service_{i}") for i in range(STEPS)]
    steps = [SagaStep(f"step{i}", s.name, "do", "undo", timeout=60.0) for i, s in enumerate(services)]
    if shape == "parallel":
        coordinator.define_saga("bench", [steps[0], Parallel(*steps[1:-1]), steps[-1]])
    else:
        coordinator.define_saga("bench", steps)
    for service in services:
        service.action("do")(do)
        service.action("undo")(undo)
    return coordinator, [orders, *services]


async def bench(url: str, sagas: int, concurrency: int, shape: str, database: str | None = None) -> dict[str, float]:
    store = None
    if database is not None:
        from choreo.postgres import PostgresStateStore

        store = PostgresStateStore(database, pool_size=20)
    coordinator, apps = build(shape, store)
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
        started, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    latencies.sort()
    return {
        "sagas_per_s": sagas / elapsed,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
        "elapsed_s": elapsed,
        "cpu_ms_per_saga": cpu / sagas * 1000,
    }


def redis_commands(server: Any) -> int:
    """Commands the server has processed so far."""
    for line in server.command("INFO", "stats").decode().splitlines():
        if line.startswith("total_commands_processed:"):
            return int(line.split(":", 1)[1])
    return 0


def pg_transactions(server: Any, database: str) -> int:
    """Transactions committed and rolled back in ``database`` so far (statistics
    are flushed when sessions end, so read after the run's connections closed)."""
    out = server.sql(f"SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = '{database}'")
    return int(out.strip() or 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sagas", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--broker", choices=("memory", "redis", "both"), default="both")
    parser.add_argument("--shape", choices=("sequential", "parallel", "both"), default="both")
    parser.add_argument("--gc-threshold", type=int, default=WORKER_GC_THRESHOLD,
                        help="collector threshold, as choreo worker sets it (0: Python's default), for both sides")
    parser.add_argument("--state", choices=("broker", "postgres"), default="broker",
                        help="postgres: each case with broker state, then with PostgreSQL state")
    args = parser.parse_args()
    tune_collector(args.gc_threshold)
    logging.basicConfig(level=logging.WARNING)
    kinds = ["memory", "redis"] if args.broker == "both" else [args.broker]
    shapes = ["sequential", "parallel"] if args.shape == "both" else [args.shape]
    states = ["broker", "postgres"] if args.state == "postgres" else ["broker"]
    postgres = None
    if args.state == "postgres":
        from tests.postgres_server import PostgresServer

        postgres = PostgresServer()
        postgres.start()
    try:
        for kind in kinds:
            for shape in shapes:
                for state in states:
                    run_case(args, kind, shape, state, postgres)
    finally:
        if postgres is not None:
            postgres.close()


def run_case(args: argparse.Namespace, kind: str, shape: str, state: str, postgres: Any) -> None:
    server = None
    url = "memory://"
    if kind == "redis":
        from tests.redis_server import RedisServer

        server = RedisServer()
        server.start()
        url = server.url
    database = postgres.create_database("bench") if state == "postgres" else None
    name = database.rsplit("/", 1)[1] if database else ""
    try:
        before = redis_commands(server) if server is not None else 0
        figures = asyncio.run(bench(url, args.sagas, args.concurrency, shape, database))
        commands = (redis_commands(server) - before) / args.sagas if server is not None else None
        if database:
            time.sleep(1.0)  # let the closed sessions' statistics reach pg_stat_database
            steps = args.sagas * STEPS
            transactions = pg_transactions(postgres, name) / steps
    finally:
        if server is not None:
            server.stop()
    extra = f", {commands:.0f} Redis commands/saga" if commands is not None else ""
    if database:
        extra += f", {transactions:.2f} PostgreSQL transactions/step"
    print(
        f"{kind:<6} {shape:<10} state={state:<8} {args.sagas} sagas x {STEPS} steps, {args.concurrency} concurrent: "
        f"{figures['sagas_per_s']:.0f} sagas/s, p50 {figures['p50_ms']:.1f} ms, "
        f"p99 {figures['p99_ms']:.1f} ms, CPU {figures['cpu_ms_per_saga']:.2f} ms/saga{extra} "
        f"({figures['elapsed_s']:.1f} s)", flush=True,
    )


if __name__ == "__main__":
    main()
