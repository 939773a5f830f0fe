"""A 3-hop chain (A -> B -> C -> D) on a local redis-server: choreo against a
raw redis-py loop doing the minimum, measured in the same run.

    python bench/chain_redis.py [--events 50000] [--latency-events 1000] [--repeat 3] [--otel [--otel-ratios 0.1,0.01]]

Starts its own redis-server on a free port (no persistence, so disk speed does
not enter). The process sets up Python's garbage collector as ``choreo
worker`` does (``--gc-threshold``, 0 for Python's default), for both loops;
choreo runs with 500 handlers in flight (``--concurrency``; with 200 its
reads and commits overlap less and it measured about 10% slower).
The raw loop: XREADGROUP COUNT 100 over the streams, then one
pipeline of XADD per entry plus one XACK per stream and batch, JSON decode and
encode per hop. Throughput counts handled events (three per chain); latency is
one chain at a time, publish of A to arrival of D, on an idle system. Memory
is how far the process's resident set rose during each throughput run. With
``--repeat``, rounds alternate raw and choreo and the medians are compared:
on a shared machine single runs of the latency ratio were seen to spread
from 1.5 to 2.4. ``--otel`` adds a third contender to each round: choreo with
``choreo.otel.TracingMiddleware`` on an SDK tracer provider whose batch
processor hands spans to an exporter that drops them (the cost of tracing,
not of shipping spans), compared with choreo untraced; ``--otel-ratios``
adds one more contender per ratio, the same provider sampling with
``ParentBased(TraceIdRatioBased(ratio))``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import redis
import redis.asyncio as aioredis

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from chain_memory import chain_app as memory_chain_app  # this folder, run as a script

from choreo import App, Event, run
from choreo.middleware import Middleware
from choreo.supervisor import WORKER_GC_THRESHOLD, tune_collector
from choreo.worker import Runtime
from tests.redis_server import RedisServer

#: choreo's handlers in flight (``choreo worker --concurrency``).
CONCURRENCY = 500
PAYLOAD = {"order_id": "O-000000", "sku": "SKU-1", "quantity": 1, "note": "x" * 24}
NEXT = {"bench.a": "bench.b", "bench.b": "bench.c", "bench.c": "bench.d"}


def chain_app(arrived: asyncio.Queue[float] | None = None) -> App:
    """The chain of ``chain_memory.py``; with ``arrived``, D's arrival times go there."""
    app = memory_chain_app()

    if arrived is not None:

        @app.on_event("bench.d")
        async def arrive(data: dict[str, Any]) -> None:
            arrived.put_nowait(time.perf_counter())

    return app


async def settle(runtime: Runtime) -> None:
    """Wait until every group is quiet (what ``TestEnv.settle`` does, without
    the test harness's record of every published event)."""
    while True:
        backlog = await runtime.broker.backlog(runtime.subscriptions)
        if runtime.in_flight == 0 and all(b.idle for b in backlog):
            return
        await asyncio.sleep(0.01)


async def choreo_throughput(
    url: str, events: int, concurrency: int = CONCURRENCY, middleware: Sequence[Middleware] = ()
) -> float:
    # ``run`` is what ``choreo worker`` runs: the production path.
    async with run(chain_app(), broker=url, concurrency=concurrency, middleware=middleware) as runtime:
        start = time.perf_counter()
        for n in range(0, events, 500):  # batches of 500, as the raw loop publishes
            batch = [Event("bench.a", {**PAYLOAD, "n": m}) for m in range(n, min(n + 500, events))]
            await runtime.commit([(event, None) for event in batch])
        await settle(runtime)
        elapsed = time.perf_counter() - start
    return events * 3 / elapsed


async def choreo_latency(url: str, events: int, middleware: Sequence[Middleware] = ()) -> list[float]:
    arrived: asyncio.Queue[float] = asyncio.Queue()
    latencies = []
    async with run(chain_app(arrived), broker=url, middleware=middleware) as runtime:
        for n in range(events):
            start = time.perf_counter()
            await runtime.publish("bench.a", {**PAYLOAD, "n": n})
            latencies.append(await asyncio.wait_for(arrived.get(), 30) - start)
    return latencies


class RawLoop:
    """The least a Redis Streams consumer can do for this chain."""

    def __init__(self, url: str, terminal: bool) -> None:
        self.client = aioredis.Redis.from_url(url)
        self.streams = ["bench.a", "bench.b", "bench.c"] + (["bench.d"] if terminal else [])
        self.done = 0
        self.arrived: asyncio.Queue[float] = asyncio.Queue()
        self.running = True

    async def setup(self) -> None:
        for stream in self.streams:
            await self.client.xgroup_create(stream, "raw", id="$", mkstream=True)

    async def run(self) -> None:
        streams = {stream: ">" for stream in self.streams}
        while self.running:
            reply = await self.client.xreadgroup("raw", "c1", streams, count=100, block=100)
            if not reply:
                continue
            pipe = self.client.pipeline(transaction=False)
            for stream, entries in reply:
                name = stream.decode()
                for _, fields in entries:
                    message = json.loads(fields[b"body"])
                    following = NEXT.get(name)
                    if following is not None:
                        body = json.dumps({"type": following, "data": message["data"]})
                        pipe.xadd(following, {"body": body})
                    else:
                        self.arrived.put_nowait(time.perf_counter())
                    self.done += 1
                pipe.xack(stream, "raw", *[entry_id for entry_id, _ in entries])
            await pipe.execute()

    async def stop(self, task: asyncio.Task[None]) -> None:
        # Let the loop leave after its current read (within its 100 ms block):
        # cancelling a blocked redis-py read is not always honoured.
        self.running = False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), 5)
        await stop(task)

    async def publish(self, n: int) -> None:
        await self.client.xadd("bench.a", {"body": json.dumps({"type": "bench.a", "data": {**PAYLOAD, "n": n}})})


async def raw_throughput(url: str, events: int) -> float:
    loop = RawLoop(url, terminal=False)
    await loop.setup()
    task = asyncio.create_task(loop.run())
    start = time.perf_counter()
    for n in range(0, events, 500):
        pipe = loop.client.pipeline(transaction=False)
        for m in range(n, min(n + 500, events)):
            pipe.xadd("bench.a", {"body": json.dumps({"type": "bench.a", "data": {**PAYLOAD, "n": m}})})
        await pipe.execute()
    while loop.done < events * 3:
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - start
    await loop.stop(task)
    await loop.client.aclose()
    return events * 3 / elapsed


async def raw_latency(url: str, events: int) -> list[float]:
    loop = RawLoop(url, terminal=True)
    await loop.setup()
    task = asyncio.create_task(loop.run())
    latencies = []
    for n in range(events):
        start = time.perf_counter()
        await loop.publish(n)
        latencies.append(await asyncio.wait_for(loop.arrived.get(), 30) - start)
    await loop.stop(task)
    await loop.client.aclose()
    return latencies


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


class PeakRss:
    """How far this process's resident memory rose above its level at the
    start of the block (``grown``, MiB), sampled every 10 ms (Linux)."""

    STATM = "/proc/self/statm"

    def __init__(self) -> None:
        self.grown = 0.0
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def available(cls) -> bool:
        return os.path.exists(cls.STATM)

    @classmethod
    def now(cls) -> float:
        with open(cls.STATM) as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    async def __aenter__(self) -> PeakRss:
        if self.available():
            self._task = asyncio.create_task(self._sample(self.now()))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            await stop(self._task)

    async def _sample(self, start: float) -> None:
        while True:
            self.grown = max(self.grown, self.now() - start)
            await asyncio.sleep(0.01)


def tracing(ratio: float | None = None) -> list[Middleware]:
    """Tracing on, with every span dropped once made (needs the otel extra):
    every trace sampled, or with ``ratio`` a ``ParentBased(TraceIdRatioBased)``
    sampler."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, TraceIdRatioBased

    from choreo.otel import TracingMiddleware

    class Drop(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider(sampler=ALWAYS_ON if ratio is None else ParentBased(TraceIdRatioBased(ratio)))
    provider.add_span_processor(BatchSpanProcessor(Drop()))
    return [TracingMiddleware(provider)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--latency-events", type=int, default=1_000)
    parser.add_argument("--repeat", type=int, default=1, help="rounds, raw and choreo interleaved; medians reported")
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY, help="choreo's handlers in flight")
    parser.add_argument("--gc-threshold", type=int, default=WORKER_GC_THRESHOLD,
                        help="collector threshold, as choreo worker sets it (0: Python's default), for both sides")
    parser.add_argument("--otel", action="store_true",
                        help="also run choreo with OpenTelemetry tracing (spans dropped) and compare")
    parser.add_argument("--otel-ratios", default="",
                        help="with --otel, also traced with these comma-separated sampling ratios (e.g. 0.1,0.01)")
    args = parser.parse_args()
    tune_collector(args.gc_threshold)
    server = RedisServer()
    server.start()
    contenders: list[tuple[str, Any, Any]] = [
        ("raw", raw_throughput, raw_latency),
        ("choreo", functools.partial(choreo_throughput, concurrency=args.concurrency), choreo_latency),
    ]
    traced_names = []
    if args.otel:
        for ratio in [None, *(float(r) for r in args.otel_ratios.split(",") if r)]:
            traced = tracing(ratio)
            traced_names.append("traced" if ratio is None else f"traced {ratio:g}")
            contenders.append((
                traced_names[-1],
                functools.partial(choreo_throughput, concurrency=args.concurrency, middleware=traced),
                functools.partial(choreo_latency, middleware=traced),
            ))
    rates: dict[str, list[float]] = {name: [] for name, _, _ in contenders}
    p50s: dict[str, list[float]] = {name: [] for name, _, _ in contenders}
    p90s: dict[str, list[float]] = {name: [] for name, _, _ in contenders}
    lat: dict[str, list[float]] = {name: [] for name, _, _ in contenders}
    grown: dict[str, list[float]] = {name: [] for name, _, _ in contenders}
    cpu: dict[str, list[float]] = {name: [] for name, _, _ in contenders}
    try:
        db = iter(range(16))
        url = f"redis://127.0.0.1:{server.port}/"
        for _ in range(args.repeat):
            for name, throughput, latency in contenders:
                async with PeakRss() as rss:
                    used = time.process_time()
                    rates[name].append(await throughput(url + str(next(db) % 16), args.events))
                    cpu[name].append((time.process_time() - used) / (args.events * 3) * 1e6)
                grown[name].append(rss.grown)
                sample = await latency(url + str(next(db) % 16), args.latency_events)
                p50s[name].append(percentile(sample, 0.5))
                p90s[name].append(percentile(sample, 0.9))
                lat[name] += sample
            await server_flush(url)
            db = iter(range(16))
    finally:
        server.stop()
    raw_rate, choreo_rate = statistics.median(rates["raw"]), statistics.median(rates["choreo"])
    print(f"redis-py {redis.__version__}; {args.events:,} chains of 3 hops; ~{len(json.dumps(PAYLOAD))}-byte payloads;"
          f" {args.repeat} round(s), medians; concurrency {args.concurrency}; gc threshold {gc.get_threshold()[0]}")
    print(f"raw loop:  {raw_rate:,.0f} events/s")
    print(f"choreo:    {choreo_rate:,.0f} events/s")
    print(f"throughput ratio choreo/raw: {choreo_rate / raw_rate:.2f} (target >= 0.60)")
    for name in ("raw", "choreo"):
        print(
            f"{name:<7} 3-hop latency p50 {statistics.median(p50s[name]) * 1000:.2f} ms, "
            f"p99 {percentile(lat[name], 0.99) * 1000:.2f} ms (mean {statistics.fmean(lat[name]) * 1000:.2f} ms)"
        )
    for name in rates:
        print(f"{name:<11} process CPU per handled event (publishing included): "
              f"{statistics.median(cpu[name]):.1f} us; per round: {' / '.join(f'{c:.1f}' for c in cpu[name])}")
    ratio = statistics.median(p50s["choreo"]) / statistics.median(p50s["raw"])
    print(f"latency ratio p50 choreo/raw: {ratio:.2f} (target <= 2)")
    if PeakRss.available():
        print("resident memory added at the peak of a throughput run: "
              f"raw {statistics.median(grown['raw']):.1f} MiB, choreo {statistics.median(grown['choreo']):.1f} MiB")
    for name in traced_names:
        traced_rate = statistics.median(rates[name])
        traced_p50 = statistics.median(p50s[name])
        print(f"{name + ':':<11} {traced_rate:,.0f} events/s, 3-hop latency p50 {traced_p50 * 1000:.2f} ms")
        traced_cpu, choreo_cpu = statistics.median(cpu[name]), statistics.median(cpu["choreo"])
        print(f"{name} cost per handled event: {(1 / traced_rate - 1 / choreo_rate) * 1e6:.1f} us, "
              f"CPU +{traced_cpu - choreo_cpu:.1f} us (+{(traced_cpu / choreo_cpu - 1) * 100:.1f}%), "
              f"throughput -{(1 - traced_rate / choreo_rate) * 100:.1f}%, "
              f"latency p50 {(traced_p50 / statistics.median(p50s['choreo']) - 1) * 100:+.1f}% (target < 10%); "
              f"CPU cost per round: "
              + " / ".join(f"+{(t / c - 1) * 100:.0f}%" for t, c in zip(cpu[name], cpu["choreo"], strict=True)))
    if args.repeat > 1:
        rounds = zip(rates["raw"], rates["choreo"], p50s["raw"], p50s["choreo"], strict=True)
        print("per round (throughput ratio, latency ratio):",
              " ".join(f"({c / r:.2f}, {cl / rl:.2f})" for r, c, rl, cl in rounds))
        for name in rates:
            print(f"per round {name:<11} events/s: {' / '.join(f'{r:,.0f}' for r in rates[name])}")
        for name in rates:
            print(f"per round {name:<11} latency p50 / p90 ms: "
                  + "  ".join(f"{a * 1000:.2f} / {b * 1000:.2f}" for a, b in zip(p50s[name], p90s[name], strict=True)))


async def server_flush(url: str) -> None:
    """Empty every database between rounds so each starts from the same state."""
    client = aioredis.Redis.from_url(url + "0")
    await client.flushall()
    await client.aclose()


if __name__ == "__main__":
    asyncio.run(main())
