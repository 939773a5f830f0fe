"""The soak (catalogue T15): many events through worker subprocesses under chaos.

    python -m tests.soak --events 1000000          # the full soak (minutes)
    python -m tests.soak --events 100000 --seed 7  # a shorter one, another chaos seed

What it does, on a private redis-server with ``appendonly yes`` on a free port:

* two ``choreo worker tests.apps.lab:app`` processes consume ``lab.job`` and
  emit one ``lab.done`` per job (the effect, committed with the ack);
* a producer publishes N numbered jobs in batches, 1% of them a second time
  in a later batch (producer duplicates), keeping the backlog bounded;
* every ``--kill-every`` seconds one worker (in turn) is SIGKILLed and a
  fresh one started; once, a third of the way in, Redis is SIGSTOPped for
  ``--freeze`` seconds;
* the ledger reads ``lab.done`` through its own consumer group (so retention
  never trims an effect it has not counted) and counts effects per job.

It ends when every job took effect and the group is drained (no pending
entries, last-delivered id equal to the stream's last id), and prints the
figures. Exit status 0 only with ``missing == 0`` and ``double == 0``.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import sys
from typing import Any

import attrs
import redis.asyncio as aioredis

from choreo import Event
from choreo.worker import run
from tests.redis_server import RedisServer
from tests.soak_common import Clock, GroupLedger, Log, SoakFigures, Workers, arguments, report, settle
from tests.soak_common import log as stderr_log
from tests.worker_process import WorkerProcess

JOB = re.compile(rb'"job":(\d+)')


@attrs.define
class Figures(SoakFigures):
    duplicates: int = 0
    effects: int = 0
    missing: int = 0
    double: int = 0
    freezes: int = 0

    @property
    def clean(self) -> bool:
        return (self.missing, self.double, self.dead_letters) == (0, 0, 0)

    def count(self, ledger: Ledger) -> None:
        """The effects the ledger counted: how many, and the jobs missing or doubled."""
        self.effects = ledger.total
        self.missing = ledger.missing()
        self.double = ledger.double()

    def line(self) -> str:
        return (
            f"soak: {self.events} events ({self.duplicates} producer duplicates) in {self.seconds:.1f}s = "
            f"{self.throughput:,.0f} ev/s through 2 workers; {self.kills} worker kills, {self.freezes} Redis freeze; "
            f"missing {self.missing}, double {self.double}, dead letters {self.dead_letters}, "
            f"drained {self.drain_seconds:.1f}s after the last publish; {self.worker_log_lines} worker log lines"
        )


class Ledger(GroupLedger):
    """Counts ``lab.done`` effects per job number, read through a consumer group."""

    stream = "choreo:lab.done"

    def __init__(self, client: Any, events: int) -> None:
        super().__init__(client)
        self.counts = bytearray(events)

    def take(self, body: bytes) -> None:
        match = JOB.search(body)
        job = int(match.group(1)) if match else int(json.loads(body)["data"]["job"])
        if self.counts[job] < 255:
            self.counts[job] += 1

    def missing(self) -> int:
        return self.counts.count(0)

    def double(self) -> int:
        return len(self.counts) - self.counts.count(0) - self.counts.count(1)


def start_worker(url: str) -> WorkerProcess:
    return WorkerProcess("tests.apps.lab:app", "--broker", url).start(timeout=60)


async def drained(client: Any, stream: str = "choreo:lab.job", name: bytes = b"lab.work") -> bool:
    """No pending entries and nothing undelivered in the group ``name`` of
    ``stream`` (RELIABILITY rule 12), and no delayed message waiting."""
    try:
        groups = await client.xinfo_groups(stream)
        info = await client.xinfo_stream(stream)
    except Exception:
        return False
    group = next((g for g in groups if g["name"] == name), None)
    if group is None:
        return False
    last = info["last-generated-id"]
    return group["pending"] == 0 and group["last-delivered-id"] == last and await client.zcard("choreo:_delayed") == 0


async def publish_jobs(url: str, figures: Figures, ledger: Ledger, *, batch: int, rng: random.Random, log: Log) -> None:
    """Publish ``figures.events`` numbered jobs in batches, 1% of them a second time in the next batch, each
    batch published again until acknowledged (dedupe absorbs the copies), keeping the backlog bounded."""
    async with run(broker=url) as producer:
        later: list[Event] = []
        n = 0
        while n < figures.events or later:
            # Keep the backlog bounded: the soak measures steady state, not a queue.
            while figures.published - figures.duplicates - ledger.total > 20 * batch:
                await asyncio.sleep(0.01)
            jobs = [Event(type="lab.job", data={"job": n + i}) for i in range(min(batch, figures.events - n))]
            n += len(jobs)
            dupes = [e for e in jobs if rng.random() < 0.01]
            outgoing = jobs + later
            while True:
                try:
                    await producer.commit([(e, None) for e in outgoing])
                    break
                except Exception as exc:  # Redis frozen or a master failing over
                    log(f"publish retried: {type(exc).__name__}")
                    await asyncio.sleep(0.2)
            figures.published += len(outgoing)
            figures.duplicates += len(later)
            later = dupes if jobs else []


async def soak(events: int, *, seed: int, kill_every: float, freeze: float, batch: int, log: Log) -> Figures:
    rng = random.Random(seed)
    figures = Figures(events)
    server = RedisServer(appendonly=True)
    server.start()
    options = "visibility_timeout=2&claim_interval=0.5&max_deliveries=50&maxlen=100000&dedupe_ttl=3600"
    url = f"{server.url}?{options}"
    client = aioredis.from_url(server.url)
    workers = Workers(figures, lambda: asyncio.to_thread(start_worker, url), rng=rng, kill_every=kill_every)
    try:
        ledger = Ledger(client, events)
        await ledger.setup()
        await workers.start()
        clock = Clock(log)

        async def produce() -> None:
            await publish_jobs(url, figures, ledger, batch=batch, rng=rng, log=log)
            clock.published()

        async def freeze_once() -> None:
            if not figures.freezes and ledger.total >= events // 3:
                log(f"freezing Redis for {freeze:.0f}s")
                server.pause()
                await asyncio.sleep(freeze)
                server.resume()
                figures.freezes += 1

        async def count() -> None:
            while ledger.missing() and not clock.overdue():
                await ledger.read()
                clock.report(ledger.total, "effects", figures.kills)

        await asyncio.gather(produce(), workers.rotate(clock.publishing, freeze_once), count())
        await settle(clock, figures, lambda: drained(client), ledger.read, "the lab group did not drain within 120 s")
        figures.count(ledger)
        figures.dead_letters = await client.xlen("choreo:_dead")
    finally:
        workers.stop()
        await client.aclose()
        server.stop()
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = arguments("python -m tests.soak", __doc__, events=1_000_000, kill_every=4.0)
    parser.add_argument("--freeze", type=float, default=3.0, help="seconds of the one Redis SIGSTOP")
    parser.add_argument("--batch", type=int, default=500, help="jobs per producer commit")
    figures = asyncio.run(soak(**vars(parser.parse_args(argv)), log=stderr_log))
    return report(figures, figures.line())


if __name__ == "__main__":
    sys.exit(main())
