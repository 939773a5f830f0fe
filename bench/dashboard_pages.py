"""Server time of the dashboard's saga list with many sagas in Redis state
and in PostgreSQL state.

    python bench/dashboard_pages.py [--sagas 100000] [--requests 15] [--state redis|postgres] [--explain]

Starts its own redis-server on a free port, writes ``--sagas`` saga records
(a tenth FAILED, the rest COMPLETED, two saga names) through the broker's
state, then asks the dashboard's ASGI app for pages in this process (no
network: the time is the server's) and reports, per page, the p50 and p90
wall time, the dashboard process's CPU time and Redis's CPU time per
request. The baseline, measured in the same run, is one read of every
record through the broker's State role (``list_state``): the least any page
that reads sagas from broker state can cost without an index.

``--state postgres`` then does the same with the records in PostgreSQL
(``choreo dashboard --database``): a private cluster (``tests.postgres_server``,
fsync off) is started, the same records are written with one COPY, the table
is vacuumed and analyzed (what autovacuum does soon after a bulk load), and
the pages are asked of a dashboard reading ``PostgresStateStore``. Its extra
column is the CPU time of the PostgreSQL server's processes per request; its
baseline is one ``get_record`` (one round trip and one record decoded: the
least any page costs from the database). ``--explain`` prints the plans of
the queries behind the pages (``EXPLAIN ANALYZE``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import brokers
from choreo.dashboard import create_app
from choreo.saga.definition import SagaState
from choreo.saga.record import SagaRecord
from tests.dashboard_seed import record, write_records
from tests.redis_server import RedisServer

PAGES = ("/sagas", "/sagas?state=failed&name=trip", "/api/sagas?limit=500")
#: The SQL behind the pages (``PostgresStateStore.page_records`` and ``count_records``), for ``--explain``.
PLANS = (
    "SELECT record FROM choreo_sagas ORDER BY created_at DESC, saga_id DESC LIMIT 51",
    "SELECT state, count(*) FROM choreo_sagas GROUP BY state",
    "SELECT record FROM choreo_sagas WHERE state = 'failed' AND name = 'trip'"
    " ORDER BY created_at DESC, saga_id DESC LIMIT 51",
    "SELECT state, count(*) FROM choreo_sagas WHERE name = 'trip' GROUP BY state",
    "SELECT record FROM choreo_sagas ORDER BY created_at DESC, saga_id DESC LIMIT 501",
)

Cpu = Callable[[], Awaitable[float]]


async def get(app: Any, path: str) -> tuple[int, bytes]:
    """One GET through the ASGI interface: status and body."""
    target, _, query = path.partition("?")
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": target, "raw_path": target.encode(), "query_string": query.encode(), "root_path": "",
             "headers": [(b"host", b"127.0.0.1")], "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8600)}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def redis_cpu(client: aioredis.Redis) -> Cpu:
    async def used() -> float:
        cpu: dict[str, Any] = await client.info("cpu")
        return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])
    return used


def server_cpu(leader: int) -> Cpu:
    """CPU seconds of ``leader`` and its live children: the PostgreSQL
    server and its backends (Linux ``/proc``; each backend is a session of
    its own, so not in the server's process group)."""
    ticks = os.sysconf("SC_CLK_TCK")

    async def used() -> float:
        total = 0
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue  # gone meanwhile
            if int(entry.name) == leader or int(fields[1]) == leader:  # ppid
                total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / ticks
    return used


async def measure(label: str, call: Callable[[], Awaitable[Any]], requests: int, server: str, cpu: Cpu) -> None:
    await call()  # warm
    walls = []
    cpu_start, server_start = time.process_time(), await cpu()
    for _ in range(requests):
        start = time.perf_counter()
        await call()
        walls.append(time.perf_counter() - start)
    used = (time.process_time() - cpu_start) / requests
    server_used = (await cpu() - server_start) / requests
    walls.sort()
    p90 = walls[min(len(walls) - 1, int(len(walls) * 0.9))]
    print(f"{label:44} p50 {statistics.median(walls) * 1000:8.1f} ms  p90 {p90 * 1000:8.1f} ms"
          f"  CPU {used * 1000:8.1f} ms  {server} CPU {server_used * 1000:7.1f} ms  per request")


async def pages(app: Any, state: str, requests: int, server: str, cpu: Cpu) -> None:
    for path in PAGES:
        async def page(path: str = path) -> None:
            status, body = await get(app, path)
            if status != 200:
                raise SystemExit(f"{path}: {status} {body[:200]!r}")
        await measure(f"{state}: {path}", page, requests, server, cpu)


def seed(count: int) -> list[SagaRecord]:
    now = time.time()
    return [
        record(f"S-{n:07d}", now - count + n, name="checkout" if n % 2 else "trip",
               state=SagaState.FAILED if n % 10 == 0 else SagaState.COMPLETED)
        for n in range(count)
    ]


async def redis_state(args: argparse.Namespace, records: list[SagaRecord]) -> None:
    server = RedisServer()
    server.start()
    try:
        broker = brokers.from_url(server.url)
        await broker.connect()
        started = time.perf_counter()
        await write_records(broker, records)
        print(f"{len(records)} saga records written to Redis state in {time.perf_counter() - started:.1f} s "
              f"(redis-server at {server.url}); {args.requests} requests per page")
        watcher = aioredis.Redis.from_url(server.url)
        app = create_app(server.url)
        await get(app, "/api/health")

        async def baseline() -> None:
            await broker.list_state("saga:")

        await measure("redis: baseline, list_state of every saga", baseline, args.requests, "Redis",
                      redis_cpu(watcher))
        await pages(app, "redis", args.requests, "Redis", redis_cpu(watcher))
        await watcher.aclose()
        await broker.close()
        await app.state.dashboard.broker.close()
    finally:
        server.stop()


async def copy_records(store: Any, records: list[SagaRecord]) -> None:
    """The records as ``PostgresStateStore`` writes them, in one COPY."""
    columns = ("saga_id, name, state, definition_version, correlation_id, created_at, updated_at, due_at,"
               " deadline_at, record, row_version")
    async with store.database.connection() as conn, conn.cursor() as cur:
        async with cur.copy(f"COPY choreo_sagas ({columns}) FROM STDIN") as copy:
            for r in records:
                await copy.write_row((r.saga_id, r.name, r.state.value, r.version, r.correlation, r.created_at,
                                      r.updated_at, r.due_at, r.deadline_at, r.to_json().decode(), 1))
        await conn.execute("VACUUM ANALYZE choreo_sagas")


async def postgres_state(args: argparse.Namespace, records: list[SagaRecord]) -> None:
    from choreo.postgres import PostgresStateStore
    from tests.postgres_server import PostgresServer

    redis_server = RedisServer()  # the dashboard's broker (streams, dead letters): not read by these pages
    redis_server.start()
    postgres = PostgresServer()
    try:
        postgres.start()
        url = postgres.create_database("dashboard")
        store = PostgresStateStore(url)
        await store.database.open()  # creates the tables
        started = time.perf_counter()
        await copy_records(store, records)
        print(f"{len(records)} saga records written to PostgreSQL state in {time.perf_counter() - started:.1f} s "
              f"(one COPY, then VACUUM ANALYZE); {args.requests} requests per page")
        assert postgres.process is not None
        cpu = server_cpu(postgres.process.pid)
        app = create_app(redis_server.url, sagas=store, database=url)
        await get(app, "/api/health")

        async def baseline() -> None:
            await store.get_record(records[len(records) // 2].saga_id)

        await measure("postgres: baseline, get_record of one saga", baseline, args.requests, "PostgreSQL", cpu)
        await pages(app, "postgres", args.requests, "PostgreSQL", cpu)
        if args.explain:
            async with store.database.connection() as conn:
                for sql in PLANS:
                    cur = await conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql)
                    plan = "\n    ".join(row[0] for row in await cur.fetchall())
                    print(f"\n{sql}\n    {plan}")
        await store.database.close()
        await app.state.dashboard.broker.close()
    finally:
        postgres.close()
        redis_server.stop()


async def main(args: argparse.Namespace) -> None:
    records = seed(args.sagas)
    await redis_state(args, records)
    if args.state == "postgres":
        await postgres_state(args, records)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sagas", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=15)
    parser.add_argument("--state", choices=("redis", "postgres"), default="redis",
                        help="postgres: the pages with Redis state, then with PostgreSQL state, in the same run")
    parser.add_argument("--explain", action="store_true", help="with --state postgres: the queries' plans")
    asyncio.run(main(parser.parse_args()))
