"""The soak on Redis Cluster (catalogue T15 and T30): many events through
worker subprocesses while workers and one master are killed.

    python -m tests.soak_cluster --events 1000000
    python -m tests.soak_cluster --events 100000 --seed 7

What it does, on a private cluster of 3 masters and 3 replicas (``appendonly
yes`` on every node), ``redis+cluster://`` with the default 16 partitions:

* two ``choreo worker tests.apps.lab:app`` processes consume ``lab.job`` and
  emit one ``lab.done`` per job (the effect, committed with the ack);
* a producer publishes N numbered jobs in batches, 1% of them a second time
  in a later batch (producer duplicates), each batch retried until
  acknowledged, keeping the backlog bounded;
* every ``--kill-every`` seconds one worker (in turn) is SIGKILLed and a
  fresh one started; once, a third of the way in, a master is SIGKILLed
  (its replica takes over);
* the ledger reads every partition's ``lab.done`` through its own consumer
  group and counts effects per job;
* every ``--sample`` effects it records each live node's ``used_memory``.

It ends when every job took effect and every partition's group is drained,
and prints the figures. Exit status 0 only with ``missing == 0``,
``double == 0``, no dead letters and the masters' memory flat after warm-up
(retention at its defaults: ``maxlen`` and ``dedupe_max`` bound a topic and a
group across all partitions).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
import time
from collections.abc import Callable
from typing import Any

import attrs
import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.cluster import RedisCluster as ClusterClient

from brokers.redis_keys import Keys
from tests.redis_cluster import RedisCluster
from tests.soak import Figures, Ledger, publish_jobs, start_worker
from tests.soak_common import LEDGER_GROUP, Clock, Log, Workers, arguments, report, settle
from tests.soak_common import log as stderr_log
from tests.worker_process import WorkerProcess

KEYS = Keys("choreo", 16)


@attrs.define
class ClusterFigures(Figures):
    """The soak's figures and the memory of every node over the run."""

    #: (effects counted, {port: used_memory in bytes} of the nodes that are masters then), in order.
    memory: list[tuple[int, dict[int, int]]] = attrs.Factory(list)

    @property
    def flat(self) -> bool:
        """Bounded after warm-up: the masters' total ``used_memory`` in the
        second half never exceeds the highest total between a quarter and
        half way by more than 25% (as ``tests.retention_soak`` judges one Redis:
        sweeps trim every 5 s and dedupe buckets rotate, so memory saws; without
        retention it would grow by the second half's entries)."""
        totals = [(counted, sum(used.values())) for counted, used in self.memory]
        early = [total for counted, total in totals if self.events // 4 <= counted < self.events // 2]
        late = [total for counted, total in totals if counted >= self.events // 2]
        return bool(early and late) and max(late) <= 1.25 * max(early)

    @property
    def clean(self) -> bool:
        return super().clean and self.flat

    def memory_line(self) -> str:
        cells = [f"{counted // 1000}k {sum(used.values()) / 2**20:.0f}" for counted, used in self.memory]
        return f"masters' used_memory MiB by effects: {', '.join(cells)}; flat after warm-up: {self.flat}"


async def masters_memory(cluster: RedisCluster) -> dict[int, int]:
    """``used_memory`` of each node that is a master now (a dead node is left out)."""
    used: dict[int, int] = {}
    for node in cluster.nodes:
        if node.process is None or node.process.poll() is not None:
            continue
        client = aioredis.Redis(port=node.port, socket_timeout=2)
        with contextlib.suppress(Exception):  # a node failing over answers later
            if (await client.info("replication"))["role"] == "master":
                used[node.port] = int((await client.info("memory"))["used_memory"])
        await client.aclose()
    return used


class ClusterLedger(Ledger):
    """The Redis soak's ledger on each partition's ``lab.done`` stream.

    Its own client may be left stuck by a master kill (redis-py's cluster
    client, no timeouts of its own), or pointing at the dead master: every
    call has a deadline, and after a timeout or a refused connection the
    client is replaced and the partition's ledger group re-read
    from its pending entries (a reply lost on the way leaves them there),
    skipping those counted whose ack was not confirmed.
    """

    def __init__(self, connect: Callable[[], Any], events: int, log: Log = print) -> None:
        super().__init__(connect(), events)
        self.connect = connect
        self.log = log
        self.quiet_until = 0.0
        self.renewed = 0.0
        self.retired: list[Any] = []
        self.streams = [KEYS.stream("lab.done", p) for p in range(KEYS.count)]
        self.recover: set[str] = set()
        self.unacked: dict[str, set[bytes]] = {key: set() for key in self.streams}

    async def close(self) -> None:
        for client in (*self.retired, self.client):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.aclose(), 5)

    async def setup(self) -> None:
        for key in self.streams:
            await self.client.xgroup_create(key, LEDGER_GROUP, id="0", mkstream=True)

    async def read(self) -> int:
        """Read what is there now; returns how many effects were counted."""
        read = 0
        for key in self.streams:
            try:
                read += await asyncio.wait_for(self._read(key), 10)
            except Exception as exc:  # a master failing over: read it again later
                self.recover.add(key)
                if time.monotonic() >= self.quiet_until:
                    self.quiet_until = time.monotonic() + 10
                    self.log(f"ledger read of {key} failed: {type(exc).__name__}: {exc}")
                # A stuck client, or one whose slot map still names the dead
                # master after its replica took over (seen: refused for minutes,
                # the producer waiting on the ledger meanwhile): a new one, at
                # most once a second, the old ones closed at the end.
                if isinstance(exc, TimeoutError | rexc.ConnectionError | rexc.TimeoutError) and (
                        time.monotonic() >= self.renewed + 1):
                    self.renewed = time.monotonic()
                    self.retired.append(self.client)
                    self.client = self.connect()
        self.total += read
        if not read:
            await asyncio.sleep(0.05)
        return read

    async def _read(self, key: str) -> int:
        start = "0" if key in self.recover else ">"
        reply = await self.client.xreadgroup(LEDGER_GROUP, "ledger", {key: start}, count=5000)
        entries = reply[0][1] if reply else []
        if start == "0" and not entries:
            self.recover.discard(key)
        counted = 0
        for entry_id, fields in entries:
            if entry_id in self.unacked[key]:
                continue  # counted before its ack failed
            self.take(fields[b"body"])
            counted += 1
        ids = [entry_id for entry_id, _ in entries]
        self.unacked[key].update(ids)
        self.total += counted  # counted now: an ack that fails below must not undo it
        if ids:
            await self.client.xack(key, LEDGER_GROUP, *ids)
        self.unacked[key].difference_update(ids)
        self.total -= counted
        return counted


async def drained(client: Any) -> bool:
    """No pending entries and nothing undelivered in the lab group of any partition."""
    try:
        for p in range(KEYS.count):
            key = KEYS.stream("lab.job", p)
            if not await client.exists(key):
                continue
            groups = await client.xinfo_groups(key)
            info = await client.xinfo_stream(key)
            group = next((g for g in groups if g["name"] == b"lab.work"), None)
            if group is None or group["pending"] or group["last-delivered-id"] != info["last-generated-id"]:
                return False
            if await client.zcard(KEYS.delayed(p)):
                return False
    except Exception:
        return False
    return True


async def restart_worker(url: str, log: Log) -> WorkerProcess:
    """A fresh worker, started again while it fails: one started during the
    master kill's failover may find the partition count's master down (as a
    process supervisor would, it is started again)."""
    for attempt in range(30):
        try:
            return await asyncio.to_thread(start_worker, url)
        except AssertionError as exc:
            log(f"worker start failed (attempt {attempt + 1}): {str(exc).splitlines()[-1][:160]}")
            await asyncio.sleep(1.0)
    return await asyncio.to_thread(start_worker, url)


async def soak(
    events: int, *, seed: int, kill_every: float, batch: int, log: Log, sample: int = 50_000,
) -> ClusterFigures:
    rng = random.Random(seed)
    figures = ClusterFigures(events)
    cluster = RedisCluster(appendonly=True)
    cluster.start()
    options = "visibility_timeout=2&claim_interval=0.5&max_deliveries=50&dedupe_ttl=3600"
    url = f"{cluster.url}?{options}"

    def connect() -> Any:
        return ClusterClient(startup_nodes=[ClusterNode("127.0.0.1", port) for port in cluster.master_ports()],
                             socket_timeout=5, socket_connect_timeout=2)

    client = connect()
    workers = Workers(figures, lambda: asyncio.to_thread(start_worker, url), rng=rng, kill_every=kill_every,
                      restart=lambda: restart_worker(url, log))
    ledger = ClusterLedger(connect, events, log)
    try:
        await ledger.setup()
        await workers.start()
        clock = Clock(log)

        async def produce() -> None:
            await publish_jobs(url, figures, ledger, batch=batch, rng=rng, log=log)
            clock.published()

        async def kill_a_master_once() -> None:
            if not figures.freezes and ledger.total >= events // 3:
                port = cluster.master_ports()[rng.randrange(3)]
                log(f"killing the master on port {port}")
                cluster.node(port).kill()
                figures.freezes += 1

        async def count() -> None:
            next_sample = sample
            while ledger.missing() and not clock.overdue():
                await ledger.read()
                if ledger.total >= next_sample:
                    next_sample += sample
                    used = await masters_memory(cluster)
                    figures.memory.append((ledger.total, used))
                    log(f"{ledger.total:,} effects, used_memory MiB by master port: "
                        + ", ".join(f"{port} {b / 2**20:.1f}" for port, b in sorted(used.items())))
                clock.report(ledger.total, "effects", figures.kills)

        await asyncio.gather(produce(), workers.rotate(clock.publishing, kill_a_master_once), count())
        await settle(clock, figures, lambda: drained(client), ledger.read, "the lab group did not drain within 120 s")
        figures.count(ledger)
        figures.dead_letters = sum([int(await client.xlen(KEYS.dead_letters(p))) for p in range(KEYS.count)])
    finally:
        workers.stop()
        await client.aclose()
        await ledger.close()
        cluster.stop()
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = arguments("python -m tests.soak_cluster", __doc__, events=1_000_000, kill_every=4.0)
    parser.add_argument("--batch", type=int, default=500, help="jobs per producer commit")
    parser.add_argument("--sample", type=int, default=50_000, help="effects between memory samples")
    figures = asyncio.run(soak(**vars(parser.parse_args(argv)), log=stderr_log))
    line = figures.line().replace("Redis freeze", "master kill").replace("soak:", "cluster soak:")
    return report(figures, line, figures.memory_line())


if __name__ == "__main__":
    sys.exit(main())
