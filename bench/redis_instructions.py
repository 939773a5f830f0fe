"""Redis instructions per chain: the 3-hop chain's cost to redis-server, counted
by ``valgrind --tool=callgrind``, for choreo and for the raw redis-py loop.

    python bench/redis_instructions.py [--chains 2000] [--warmup 200] [--side both|raw|choreo] [--top 0]

Each side gets a redis-server of its own, started under callgrind with
instrumentation off. The side's loop starts, a warm-up of ``--warmup``
chains goes through (connections, groups and scripts set up, the first
dedupe bucket opened), then instrumentation is switched on
(``callgrind_control -i on``) while ``--chains`` chains pass, and off again.
Instruction counts do not depend on the machine's load, unlike CPU time: they
are the figure to compare before and after a change on a shared machine.

- choreo: ``choreo.run`` (what ``choreo worker`` runs, 500 handlers in
  flight) with the chain of ``chain_redis.py``, root events committed 500 at
  a time;
- raw: ``chain_redis.RawLoop`` (XREADGROUP COUNT 100 over the streams, one
  pipeline of XADDs and XACKs per read), root events XADDed 500 a pipeline.

Completion is watched without asking Redis much: the raw loop counts in
process; choreo's side asks XLEN of the last stream every 0.2 s. ``--top N``
also prints the N functions of redis-server with the most inclusive
instructions (``callgrind_annotate --inclusive=yes``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis.asyncio as aioredis

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from chain_redis import PAYLOAD, RawLoop, chain_app  # this folder, run as a script

from choreo import Event, run
from choreo.supervisor import WORKER_GC_THRESHOLD, tune_collector
from tests.redis_server import free_port

#: Seconds a side may go without progress before it is abandoned.
STALL = 120.0


class CallgrindRedis:
    """A redis-server under callgrind, instrumentation off until ``count``."""

    def __init__(self) -> None:
        for tool in ("valgrind", "callgrind_control", "redis-server"):
            if shutil.which(tool) is None:
                raise SystemExit(f"{tool} is not installed")
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="choreo-callgrind-"))
        self.out = self.dir / "callgrind.out"
        self.process = subprocess.Popen(
            ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={self.out}",
             "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--save", "", "--appendonly", "no", "--maxmemory-policy", "noeviction"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"

    async def ready(self) -> None:
        deadline = time.monotonic() + 60
        client = aioredis.Redis.from_url(self.url)
        while True:
            try:
                await client.ping()
                break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise SystemExit("redis-server under valgrind did not start") from None
                await asyncio.sleep(0.2)
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        await client.aclose()

    def instrument(self, on: bool) -> None:
        subprocess.run(["callgrind_control", "-i", "on" if on else "off", str(self.process.pid)],
                       check=True, capture_output=True)

    def finish(self, top: int) -> tuple[int, str]:
        """Stop the server; its instructions while instrumented, and the top functions."""
        self.process.terminate()
        self.process.wait(timeout=120)
        outs = sorted(self.dir.glob("callgrind.out*"))
        total, listing = 0, []
        for out in outs:
            annotated = subprocess.run(["callgrind_annotate", "--inclusive=yes", str(out)],
                                       capture_output=True, text=True, check=True).stdout
            rows = [line for line in annotated.splitlines() if re.match(r"^\s*[\d,]+ \(", line)]
            match = re.match(r"^\s*([\d,]+) .*PROGRAM TOTALS", rows[0]) if rows else None
            total += int(match.group(1).replace(",", "")) if match else 0
            listing += rows[1:top + 1]
        shutil.rmtree(self.dir, ignore_errors=True)
        return total, "\n".join(listing)


async def raw_side(server: CallgrindRedis, chains: int, warmup: int) -> None:
    loop = RawLoop(server.url, terminal=False)
    await loop.setup()
    task = asyncio.create_task(loop.run())

    async def chains_through(first: int, count: int) -> None:
        target = loop.done + count * 3
        for n in range(first, first + count, 500):
            pipe = loop.client.pipeline(transaction=False)
            for m in range(n, min(n + 500, first + count)):
                body = json.dumps({"type": "bench.a", "data": {**PAYLOAD, "n": m}})
                pipe.xadd("bench.a", {"body": body})
            await pipe.execute()
        await progress(lambda: loop.done, target)

    await chains_through(0, warmup)
    server.instrument(True)
    await chains_through(warmup, chains)
    server.instrument(False)
    await loop.stop(task)
    await loop.client.aclose()


async def choreo_side(server: CallgrindRedis, chains: int, warmup: int) -> None:
    async with run(chain_app(), broker=server.url, concurrency=500) as runtime:
        last = runtime.broker.keys.stream("bench.d")  # type: ignore[attr-defined]
        client = aioredis.Redis.from_url(server.url)
        arrived = [0]

        async def chains_through(first: int, count: int) -> None:
            target = arrived[0] + count
            for n in range(first, first + count, 500):
                batch = [Event("bench.a", {**PAYLOAD, "n": m}) for m in range(n, min(n + 500, first + count))]
                await runtime.commit([(event, None) for event in batch])

            async def length() -> int:
                arrived[0] = int(await client.xlen(last))
                return arrived[0]

            await progress(None, target, length)

        await chains_through(0, warmup)
        server.instrument(True)
        await chains_through(warmup, chains)
        server.instrument(False)
        await client.aclose()


async def progress(count: object, target: int, ask: object = None) -> None:
    """Wait until ``count()`` (or ``await ask()``) reaches ``target``."""
    seen, since = -1, time.monotonic()
    while True:
        now = await ask() if ask is not None else count()  # type: ignore[operator]
        if now >= target:
            return
        if now != seen:
            seen, since = now, time.monotonic()
        elif time.monotonic() - since > STALL:
            raise SystemExit(f"stalled at {now} of {target}")
        await asyncio.sleep(0.2)


async def side(name: str, chains: int, warmup: int, top: int) -> int:
    server = CallgrindRedis()
    try:
        await server.ready()
        await (raw_side if name == "raw" else choreo_side)(server, chains, warmup)
    finally:
        total, listing = server.finish(top)
    print(f"{name:6} {total:>15,} instructions for {chains:,} chains: {total / chains / 1000:,.1f} k per chain",
          flush=True)
    if listing:
        print(listing, flush=True)
    return total


async def main(args: argparse.Namespace) -> None:
    tune_collector(WORKER_GC_THRESHOLD)
    names = ["raw", "choreo"] if args.side == "both" else [args.side]
    totals = {name: await side(name, args.chains, args.warmup, args.top) for name in names}
    if len(totals) == 2:
        print(f"choreo/raw: {totals['choreo'] / totals['raw']:.2f}x Redis instructions per chain")


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chains", type=int, default=2_000, help="chains counted (3 handled events each)")
    parser.add_argument("--warmup", type=int, default=200, help="chains before counting starts")
    parser.add_argument("--side", choices=("both", "raw", "choreo"), default="both")
    parser.add_argument("--top", type=int, default=0, help="also list the N most costly functions")
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(arguments()))
