"""What the soaks share (``tests.soak``, ``tests.soak_cluster``, ``tests.soak_postgres``): the figures every
one reports, the two worker processes killed in turn, the run's clock, the ledger's consumer group and the
command line's common part."""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import attrs

from tests.worker_process import WorkerProcess

MASK = re.compile(r"[0-9A-Z]{26}|[0-9]+(-[0-9]+)?|\S+-[0-9]+-[0-9a-f]+")
LEDGER_GROUP = "soak.ledger"

Log = Callable[[str], Any]


@attrs.define
class SoakFigures:
    """The figures every soak reports; each soak adds its own counts."""

    events: int
    published: int = 0
    kills: int = 0
    seconds: float = 0.0
    drain_seconds: float = 0.0
    dead_letters: int = 0
    worker_log_lines: int = 0
    #: The most frequent worker log messages (ids and numbers masked), with counts.
    log_kinds: list[tuple[str, int]] = attrs.Factory(list)

    @property
    def throughput(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0

    @property
    def clean(self) -> bool:
        """Nothing the soak counts went missing, doubled or dead."""
        raise NotImplementedError


class Workers:
    """Two worker processes, one of them SIGKILLed in turn every ``kill_every`` seconds (give or take a
    quarter) and a fresh one started in its place; kills and log lines go to ``figures``.

    ``start`` starts one worker; ``restart`` (``start`` unless given) starts the replacement of a killed one.
    """

    def __init__(
        self,
        figures: SoakFigures,
        start: Callable[[], Awaitable[WorkerProcess]],
        *,
        rng: random.Random,
        kill_every: float,
        restart: Callable[[], Awaitable[WorkerProcess]] | None = None,
    ) -> None:
        self.figures = figures
        self.start_one = start
        self.restart_one = restart or start
        self.rng = rng
        self.kill_every = kill_every
        self.live: list[WorkerProcess] = []
        self.retired: list[WorkerProcess] = []

    async def start(self) -> None:
        self.live = [await self.start_one() for _ in range(2)]

    async def rotate(self, running: Callable[[], bool], step: Callable[[], Awaitable[None]] | None = None) -> None:
        """Kill and replace workers while ``running()``; ``step`` (the soak's own chaos) runs every 50 ms."""
        turn = 0
        next_kill = self._next_kill()
        while running():
            await asyncio.sleep(0.05)
            if step is not None:
                await step()
            if time.monotonic() >= next_kill:
                victim = self.live[turn % 2]
                victim.kill()
                self.figures.kills += 1
                self.retired.append(victim)
                self.live[turn % 2] = await self.restart_one()
                turn += 1
                next_kill = self._next_kill()

    def _next_kill(self) -> float:
        return time.monotonic() + self.kill_every * self.rng.uniform(0.75, 1.25)

    def stop(self) -> None:
        """Kill the live workers; count every worker's log lines and their most frequent kinds."""
        for worker in self.live:
            worker.kill()
        lines = [line for w in self.live + self.retired for line in w.lines]
        self.figures.worker_log_lines = len(lines)
        kinds = Counter(MASK.sub("#", line.split("] ", 1)[-1])[:100] for line in lines)
        self.figures.log_kinds = kinds.most_common(5)


class Clock:
    """When counting started and publishing ended; a progress line every 10 s."""

    def __init__(self, log: Log) -> None:
        self.log = log
        self.started = time.monotonic()
        self.last_report = self.started
        self.publish_end: float | None = None

    def published(self) -> None:
        self.publish_end = time.monotonic()

    def publishing(self) -> bool:
        return self.publish_end is None

    def overdue(self) -> bool:
        """Publishing ended more than 300 s ago: the count gives up waiting for the rest."""
        return self.publish_end is not None and time.monotonic() - self.publish_end > 300

    def report(self, counted: int, what: str, kills: int) -> None:
        if time.monotonic() - self.last_report >= 10:
            self.last_report = time.monotonic()
            elapsed = self.last_report - self.started
            self.log(f"{counted:,} {what} in {elapsed:.0f}s ({counted / elapsed:,.0f} ev/s), {kills} kills")

    def stop(self, figures: SoakFigures) -> None:
        """The run's time, and the drain's since the last publish."""
        now = time.monotonic()
        figures.seconds = now - self.started
        figures.drain_seconds = now - (self.publish_end if self.publish_end is not None else now)


async def settle(
    clock: Clock,
    figures: SoakFigures,
    settled: Callable[[], Awaitable[bool]],
    read: Callable[[], Awaitable[int]],
    failure: str,
    *,
    pause: float = 0.0,
) -> None:
    """Wait up to 120 s until ``settled()``, then ``pause`` (for work still in flight), then ``read`` the
    ledger until nothing is left (late doubles would show up there) and stop the clock.

    Raises:
        SystemExit: with ``failure`` when it is still not settled.
    """
    deadline = time.monotonic() + 120
    while not await settled() and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    if pause:
        await asyncio.sleep(pause)
    while await read():
        pass
    clock.stop(figures)
    if not await settled():
        raise SystemExit(failure)


class GroupLedger:
    """One stream read through the ledger's own consumer group (so retention never trims an entry it has
    not counted); ``take`` says what an entry's body counts for, ``total`` how many entries were read."""

    stream: str

    def __init__(self, client: Any) -> None:
        self.client = client
        self.total = 0

    async def setup(self) -> None:
        await self.client.xgroup_create(self.stream, LEDGER_GROUP, id="0", mkstream=True)

    async def read(self) -> int:
        """Read what is there now (blocking up to 200 ms); returns how many entries were read."""
        reply = await self.client.xreadgroup(LEDGER_GROUP, "ledger", {self.stream: ">"}, count=5000, block=200)
        if not reply:
            return 0
        entries = reply[0][1]
        for _, fields in entries:
            self.take(fields[b"body"])
        self.total += len(entries)
        await self.client.xack(self.stream, LEDGER_GROUP, *[entry_id for entry_id, _ in entries])
        return len(entries)

    def take(self, body: bytes) -> None:
        raise NotImplementedError


def log(line: str) -> None:
    """Progress goes to stderr; the figures go to stdout."""
    print(line, file=sys.stderr, flush=True)


def arguments(prog: str, doc: str, *, events: int, kill_every: float) -> argparse.ArgumentParser:
    """The options every soak takes; each adds its own."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n")[0])
    parser.add_argument("--events", type=int, default=events)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--kill-every", type=float, default=kill_every, help="seconds between worker kills")
    return parser


def report(figures: SoakFigures, *lines: str) -> int:
    """Print the figures' lines, then the most frequent worker log lines with their counts; returns the exit
    status, 0 only when the figures are clean."""
    for line in lines:
        print(line)
    for kind, n in figures.log_kinds:
        print(f"  {n:>7} x {kind}")
    return 0 if figures.clean else 1
