"""Server time of the dashboard's saga list with many sagas in Redis state.

    python bench/dashboard_pages.py [--sagas 100000] [--requests 15]

Starts its own redis-server on a free port, writes ``--sagas`` saga records
(a tenth FAILED, the rest COMPLETED, two saga names) through the broker's
state, then asks the dashboard's ASGI app for pages in this process (no
network: the time is the server's) and reports, per page, the p50 and p90
wall time, the dashboard process's CPU time and Redis's CPU time per
request. The baseline, measured in the same run, is one read of every
record through the broker's State role (``list_state``): the least any page
that reads sagas from broker state can cost without an index.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from typing import Any

import redis.asyncio as aioredis

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import brokers
from choreo.dashboard import create_app
from choreo.saga.definition import SagaState
from tests.dashboard_seed import record, write_records
from tests.redis_server import RedisServer


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


async def redis_cpu(client: aioredis.Redis) -> float:
    cpu: dict[str, Any] = await client.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


async def measure(label: str, call: Any, requests: int, watcher: aioredis.Redis) -> None:
    await call()  # warm
    walls = []
    cpu_start, redis_start = time.process_time(), await redis_cpu(watcher)
    for _ in range(requests):
        start = time.perf_counter()
        await call()
        walls.append(time.perf_counter() - start)
    cpu = (time.process_time() - cpu_start) / requests
    redis_used = (await redis_cpu(watcher) - redis_start) / requests
    walls.sort()
    p90 = walls[min(len(walls) - 1, int(len(walls) * 0.9))]
    print(f"{label:34} p50 {statistics.median(walls) * 1000:8.1f} ms  p90 {p90 * 1000:8.1f} ms"
          f"  CPU {cpu * 1000:8.1f} ms  Redis CPU {redis_used * 1000:7.1f} ms  per request")


async def main(args: argparse.Namespace) -> None:
    server = RedisServer()
    server.start()
    try:
        broker = brokers.from_url(server.url)
        await broker.connect()
        now = time.time()
        records = [
            record(f"S-{n:07d}", now - args.sagas + n, name="checkout" if n % 2 else "trip",
                   state=SagaState.FAILED if n % 10 == 0 else SagaState.COMPLETED)
            for n in range(args.sagas)
        ]
        started = time.perf_counter()
        await write_records(broker, records)
        print(f"{args.sagas} saga records written in {time.perf_counter() - started:.1f} s "
              f"(redis-server at {server.url}); {args.requests} requests per page")
        watcher = aioredis.Redis.from_url(server.url)
        app = create_app(server.url)
        await get(app, "/api/health")

        async def page(path: str) -> None:
            status, body = await get(app, path)
            if status != 200:
                raise SystemExit(f"{path}: {status} {body[:200]!r}")

        async def baseline() -> None:
            await broker.list_state("saga:")

        await measure("baseline: list_state of every saga", baseline, args.requests, watcher)
        await measure("/sagas", lambda: page("/sagas"), args.requests, watcher)
        await measure("/sagas?state=failed&name=trip", lambda: page("/sagas?state=failed&name=trip"),
                      args.requests, watcher)
        await measure("/api/sagas?limit=500", lambda: page("/api/sagas?limit=500"), args.requests, watcher)
        await watcher.aclose()
        await broker.close()
        await app.state.dashboard.broker.close()
    finally:
        server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sagas", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=15)
    asyncio.run(main(parser.parse_args()))
