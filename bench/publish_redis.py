"""Publishing as a web service does it: many concurrent ``publish()`` calls of
one event each, on a local redis-server, against a raw redis-py publisher
that pipelines its XADDs, measured in the same run.

    python bench/publish_redis.py [--publishes 50000] [--concurrency 100] [--repeat 3]

Starts its own redis-server on a free port (no persistence, so disk speed
does not enter). choreo: an ``App`` with no routes run by ``choreo.run`` (the
production runtime), ``--concurrency`` tasks each awaiting
``app.publish(...)`` one event at a time until ``--publishes`` are done.
Raw: the same number of tasks, each building the event's JSON envelope (an
id, a timestamp, the data) and adding its XADD to a shared pipeline that one
sender flushes whenever the previous flush has returned: the least a
coalescing publisher can do. Rounds alternate raw and choreo; the medians
are compared. Per round: seconds, publishes per second, round trips per
publish (choreo: the server's EVALSHA count, one per commit batch; raw: its
pipeline flushes) and the Redis CPU per publish, read from ``INFO``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from typing import Any

import redis.asyncio as aioredis

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from brokers.redis_keys import Keys
from choreo import App, run
from tests.redis_server import RedisServer

#: Where each publisher's entries land: choreo's keys are under its prefix.
STREAMS = {"raw": "bench.published", "choreo": Keys().stream("bench.published")}
PAYLOAD = {"order_id": "O-000000", "sku": "SKU-1", "quantity": 1, "note": "x" * 24}


async def server_counters(client: aioredis.Redis) -> tuple[int, float]:
    """Script calls Redis has run and the CPU seconds it has used so far."""
    stats: dict[str, Any] = await client.info("commandstats")
    cpu: dict[str, Any] = await client.info("cpu")
    calls = int(stats.get("cmdstat_evalsha", {}).get("calls", 0))
    return calls, float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def split(total: int, parts: int) -> list[int]:
    """``total`` publishes shared out among ``parts`` tasks."""
    return [total // parts + (1 if n < total % parts else 0) for n in range(parts)]


async def choreo_round(url: str, publishes: int, concurrency: int) -> tuple[float, int | None]:
    """Seconds taken; round trips are counted by the server (``None`` here)."""
    app = App("bench-publisher")
    async with run(app, broker=url):

        async def publisher(count: int) -> None:
            for n in range(count):
                await app.publish("bench.published", {**PAYLOAD, "n": n})

        start = time.perf_counter()
        await asyncio.gather(*(publisher(count) for count in split(publishes, concurrency)))
        return time.perf_counter() - start, None


class RawPublisher:
    """Concurrent callers' XADDs, sent as one pipeline per round trip; each
    event goes to the stream named by its type."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self.queued: list[tuple[str, bytes, asyncio.Future[None]]] = []
        self.sender: asyncio.Task[None] | None = None
        self.flushes = 0

    async def publish(self, type: str, data: dict[str, Any]) -> None:
        body = json.dumps({"id": uuid.uuid4().hex, "type": type, "time": time.time(), "data": data})
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.queued.append((type, body.encode(), future))
        if self.sender is None:
            self.sender = asyncio.create_task(self.send())
        await future

    async def send(self) -> None:
        while self.queued:
            batch, self.queued = self.queued, []
            pipe = self.client.pipeline(transaction=False)
            for stream, body, _ in batch:
                pipe.xadd(stream, {"body": body})
            await pipe.execute()
            self.flushes += 1
            for _, _, future in batch:
                future.set_result(None)
        self.sender = None


async def raw_round(url: str, publishes: int, concurrency: int) -> tuple[float, int | None]:
    """Seconds taken and pipeline flushes made."""
    client = aioredis.Redis.from_url(url)
    raw = RawPublisher(client)

    async def publisher(count: int) -> None:
        for n in range(count):
            await raw.publish("bench.published", {**PAYLOAD, "n": n})

    start = time.perf_counter()
    await asyncio.gather(*(publisher(count) for count in split(publishes, concurrency)))
    elapsed = time.perf_counter() - start
    await client.aclose()
    return elapsed, raw.flushes


async def main(args: argparse.Namespace) -> None:
    server = RedisServer()
    server.start()
    figures: dict[str, list[tuple[float, float, float]]] = {"raw": [], "choreo": []}
    try:
        watcher = aioredis.Redis.from_url(server.url)
        print(f"{args.publishes} publishes, {args.concurrency} concurrent, redis-server at {server.url}")
        print("per round: name, seconds, publishes/s, round trips per publish, Redis CPU us per publish")
        for round_no in range(1, args.repeat + 1):
            for name, measure in (("raw", raw_round), ("choreo", choreo_round)):
                await watcher.flushall()
                scripts, cpu = await server_counters(watcher)
                elapsed, flushes = await measure(server.url, args.publishes, args.concurrency)
                scripts_after, cpu_after = await server_counters(watcher)
                per_publish = (scripts_after - scripts if flushes is None else flushes) / args.publishes
                redis_us = (cpu_after - cpu) / args.publishes * 1e6
                length = await watcher.xlen(STREAMS[name])
                if length != args.publishes:
                    raise SystemExit(f"{name}: {length} entries for {args.publishes} publishes")
                figures[name].append((elapsed, per_publish, redis_us))
                print(f"round {round_no}: {name:6} {elapsed:7.3f} s  {args.publishes / elapsed:9.0f}/s"
                      f"  {per_publish:6.4f} round trips/publish  {redis_us:6.1f} us Redis CPU/publish")
        await watcher.aclose()
    finally:
        server.stop()
    medians = {name: [statistics.median(column) for column in zip(*rounds, strict=True)]
               for name, rounds in figures.items()}
    for name, (elapsed, per_publish, redis_us) in medians.items():
        print(f"median {name:6} {elapsed:7.3f} s  {args.publishes / elapsed:9.0f}/s"
              f"  {per_publish:6.4f} round trips/publish  {redis_us:6.1f} us Redis CPU/publish")
    print(f"time ratio choreo/raw: {medians['choreo'][0] / medians['raw'][0]:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--publishes", type=int, default=50_000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    asyncio.run(main(parser.parse_args()))
