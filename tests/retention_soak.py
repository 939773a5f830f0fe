"""Retention at steady state (catalogue T29): Redis memory stays flat while
events flow through a worker at its default settings.

    python -m tests.retention_soak --events 1000000   # the full run (minutes)

What it does, on a private redis-server on a free port (no persistence, so
disk speed does not enter):

* one ``choreo worker tests.apps.lab:app`` process, with a broker URL that
  sets no option at all (retention, dedupe bounds: the defaults), consumes
  ``lab.job`` and emits one ``lab.done`` per job;
* a producer publishes N numbered jobs in batches, keeping the backlog
  bounded (steady state, not a queue);
* the ledger reads ``lab.done`` through its own consumer group, so retention
  may trim an effect only once it was counted, and counts effects per job;
* every ``--sample`` events it records Redis's ``used_memory``.

It ends when every job took effect and the group is drained, and prints the
memory samples. The run passes with ``missing == 0`` and ``double == 0`` (no
entry that a group still needed was trimmed) and memory flat after warm-up
(``Memory.flat``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

import attrs
import redis.asyncio as aioredis

from choreo import Event
from choreo.worker import run
from tests.redis_server import RedisServer
from tests.soak import Ledger, drained
from tests.worker_process import WorkerProcess


@attrs.define
class Memory:
    events: int
    seconds: float = 0.0
    missing: int = 0
    double: int = 0
    #: (events counted by the ledger, Redis used_memory in bytes), in order.
    samples: list[tuple[int, int]] = attrs.Factory(list)

    @property
    def flat(self) -> bool:
        """Bounded after warm-up: no sample in the second half is more than 25% above the highest
        one between a quarter and half way (memory saws up and down as sweeps trim every 5 s and
        dedupe buckets rotate; without retention it would grow by the whole second half's events)."""
        early = [used for counted, used in self.samples if self.events // 4 <= counted < self.events // 2]
        late = [used for counted, used in self.samples if counted >= self.events // 2]
        return bool(early and late) and max(late) <= 1.25 * max(early)

    def line(self) -> str:
        mb = [f"{counted // 1000}k {used / 2**20:.0f}" for counted, used in self.samples]
        return (f"retention soak: {self.events} events in {self.seconds:.0f}s through 1 worker at its defaults; "
                f"missing {self.missing}, double {self.double}; used_memory MiB by events: {', '.join(mb)}; "
                f"flat after warm-up: {self.flat}")


async def retention_soak(events: int, *, batch: int = 500, sample: int = 50_000, log: Any = print) -> Memory:
    figures = Memory(events)
    server = RedisServer()
    server.start()
    url = server.url  # no options: what a deployment gets by default
    client = aioredis.from_url(server.url)
    worker = None
    try:
        ledger = Ledger(client, events)
        await ledger.setup()
        worker = await asyncio.to_thread(lambda: WorkerProcess("tests.apps.lab:app", "--broker", url).start(timeout=60))
        started = time.monotonic()
        published = 0

        async def produce() -> None:
            nonlocal published
            async with run(broker=url) as producer:
                while published < events:
                    while published - ledger.total > 20 * batch:
                        await asyncio.sleep(0.01)
                    jobs = [Event(type="lab.job", data={"job": published + i})
                            for i in range(min(batch, events - published))]
                    await producer.commit([(e, None) for e in jobs])
                    published += len(jobs)

        async def count() -> None:
            next_sample = sample
            while ledger.missing() and time.monotonic() - started < 3600:
                await ledger.read()
                if ledger.total >= next_sample:
                    used = int((await client.info("memory"))["used_memory"])
                    figures.samples.append((ledger.total, used))
                    log(f"{ledger.total:,} effects, used_memory {used / 2**20:.1f} MiB")
                    next_sample += sample

        await asyncio.gather(produce(), count())
        deadline = time.monotonic() + 60
        while not await drained(client) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        while await ledger.read():
            pass
        figures.seconds = time.monotonic() - started
        figures.missing = ledger.missing()
        figures.double = ledger.double()
    finally:
        if worker is not None:
            worker.kill()
        await client.aclose()
        server.stop()
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.retention_soak", description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--sample", type=int, default=50_000, help="events between memory samples")
    args = parser.parse_args(argv)
    figures = asyncio.run(retention_soak(args.events, sample=args.sample,
                                         log=lambda line: print(line, file=sys.stderr, flush=True)))
    print(figures.line())
    return 0 if figures.missing == 0 and figures.double == 0 and figures.flat else 1


if __name__ == "__main__":
    sys.exit(main())
