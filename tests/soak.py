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

import argparse
import asyncio
import json
import random
import re
import sys
import time
from collections import Counter
from typing import Any

import attrs
import redis.asyncio as aioredis

from choreo import Event
from choreo.worker import run
from tests.redis_server import RedisServer
from tests.worker_process import WorkerProcess

JOB = re.compile(rb'"job":(\d+)')
MASK = re.compile(r"[0-9A-Z]{26}|[0-9]+(-[0-9]+)?|\S+-[0-9]+-[0-9a-f]+")
LEDGER_GROUP = "soak.ledger"


@attrs.define
class Figures:
    events: int
    published: int = 0
    duplicates: int = 0
    effects: int = 0
    missing: int = 0
    double: int = 0
    kills: int = 0
    freezes: int = 0
    seconds: float = 0.0
    drain_seconds: float = 0.0
    worker_log_lines: int = 0
    dead_letters: int = 0
    #: The most frequent worker log messages (ids and numbers masked), with counts.
    log_kinds: list[tuple[str, int]] = attrs.Factory(list)

    @property
    def throughput(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        return (
            f"soak: {self.events} events ({self.duplicates} producer duplicates) in {self.seconds:.1f}s = "
            f"{self.throughput:,.0f} ev/s through 2 workers; {self.kills} worker kills, {self.freezes} Redis freeze; "
            f"missing {self.missing}, double {self.double}, dead letters {self.dead_letters}, "
            f"drained {self.drain_seconds:.1f}s after the last publish; {self.worker_log_lines} worker log lines"
        )


class Ledger:
    """Counts ``lab.done`` effects per job number, read through a consumer group."""

    def __init__(self, client: Any, events: int) -> None:
        self.client = client
        self.counts = bytearray(events)
        self.total = 0

    async def setup(self) -> None:
        await self.client.xgroup_create("choreo:lab.done", LEDGER_GROUP, id="0", mkstream=True)

    async def read(self) -> int:
        """Read what is there now (blocking up to 200 ms); returns how many effects were counted."""
        reply = await self.client.xreadgroup(LEDGER_GROUP, "ledger", {"choreo:lab.done": ">"}, count=5000, block=200)
        if not reply:
            return 0
        entries = reply[0][1]
        for _, fields in entries:
            match = JOB.search(fields[b"body"])
            job = int(match.group(1)) if match else int(json.loads(fields[b"body"])["data"]["job"])
            if self.counts[job] < 255:
                self.counts[job] += 1
        self.total += len(entries)
        await self.client.xack("choreo:lab.done", LEDGER_GROUP, *[entry_id for entry_id, _ in entries])
        return len(entries)

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


async def soak(events: int, *, seed: int, kill_every: float, freeze: float, batch: int, log: Any) -> Figures:
    rng = random.Random(seed)
    figures = Figures(events)
    server = RedisServer(appendonly=True)
    server.start()
    options = "visibility_timeout=2&claim_interval=0.5&max_deliveries=50&maxlen=100000&dedupe_ttl=3600"
    url = f"{server.url}?{options}"
    client = aioredis.from_url(server.url)
    workers: list[WorkerProcess] = []
    retired: list[WorkerProcess] = []
    try:
        ledger = Ledger(client, events)
        await ledger.setup()
        workers = [await asyncio.to_thread(start_worker, url) for _ in range(2)]
        started = time.monotonic()
        done_publishing = asyncio.Event()

        async def produce() -> None:
            async with run(broker=url) as producer:
                later: list[Event] = []
                n = 0
                while n < events:
                    # Keep the backlog bounded: the soak measures steady state, not a queue.
                    while figures.published - figures.duplicates - ledger.total > 20 * batch:
                        await asyncio.sleep(0.01)
                    jobs = [Event(type="lab.job", data={"job": n + i}) for i in range(min(batch, events - n))]
                    n += len(jobs)
                    dupes = [e for e in jobs if rng.random() < 0.01]
                    outgoing = jobs + later
                    while True:
                        try:
                            await producer.commit([(e, None) for e in outgoing])
                            break
                        except Exception as exc:  # Redis frozen or restarting: publish again, dedupe absorbs it
                            log(f"publish retried: {type(exc).__name__}")
                            await asyncio.sleep(0.2)
                    figures.published += len(outgoing)
                    figures.duplicates += len(later)
                    later = dupes
                if later:
                    await producer.commit([(e, None) for e in later])
                    figures.published += len(later)
                    figures.duplicates += len(later)
            done_publishing.set()

        async def chaos() -> None:
            froze = False
            turn = 0
            next_kill = time.monotonic() + kill_every * rng.uniform(0.75, 1.25)
            while not done_publishing.is_set():
                await asyncio.sleep(0.05)
                if not froze and ledger.total >= events // 3:
                    froze = True
                    log(f"freezing Redis for {freeze:.0f}s")
                    server.pause()
                    await asyncio.sleep(freeze)
                    server.resume()
                    figures.freezes += 1
                if time.monotonic() >= next_kill:
                    victim = workers[turn % 2]
                    victim.kill()
                    figures.kills += 1
                    retired.append(victim)
                    workers[turn % 2] = await asyncio.to_thread(start_worker, url)
                    turn += 1
                    next_kill = time.monotonic() + kill_every * rng.uniform(0.75, 1.25)

        async def count() -> None:
            last_report = time.monotonic()
            while ledger.missing() and not (done_publishing.is_set() and time.monotonic() - published_at() > 300):
                await ledger.read()
                if time.monotonic() - last_report >= 10:
                    last_report = time.monotonic()
                    elapsed = last_report - started
                    log(f"{ledger.total:,} effects in {elapsed:.0f}s ({ledger.total / elapsed:,.0f} ev/s), "
                        f"{figures.kills} kills")

        publish_end: list[float] = []

        def published_at() -> float:
            return publish_end[0] if publish_end else time.monotonic()

        async def produce_and_mark() -> None:
            await produce()
            publish_end.append(time.monotonic())

        await asyncio.gather(produce_and_mark(), chaos(), count())
        deadline = time.monotonic() + 120
        while not await drained(client) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        while await ledger.read():  # late doubles would show up here
            pass
        figures.seconds = time.monotonic() - started
        figures.drain_seconds = time.monotonic() - published_at()
        figures.effects = ledger.total
        figures.missing = ledger.missing()
        figures.double = ledger.double()
        figures.dead_letters = await client.xlen("choreo:_dead")
        if not await drained(client):
            raise SystemExit("the lab group did not drain within 120 s")
    finally:
        for worker in workers:
            worker.kill()
        lines = [line for w in workers + retired for line in w.lines]
        figures.worker_log_lines = len(lines)
        kinds = Counter(MASK.sub("#", line.split("] ", 1)[-1])[:100] for line in lines)
        figures.log_kinds = kinds.most_common(5)
        await client.aclose()
        server.stop()
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--kill-every", type=float, default=4.0, help="seconds between worker kills")
    parser.add_argument("--freeze", type=float, default=3.0, help="seconds of the one Redis SIGSTOP")
    parser.add_argument("--batch", type=int, default=500, help="jobs per producer commit")
    args = parser.parse_args(argv)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    figures = asyncio.run(
        soak(args.events, seed=args.seed, kill_every=args.kill_every, freeze=args.freeze, batch=args.batch, log=log)
    )
    print(figures.line())
    for kind, n in figures.log_kinds:
        print(f"  {n:>7} x {kind}")
    return 0 if figures.missing == 0 and figures.double == 0 and figures.dead_letters == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
