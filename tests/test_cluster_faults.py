"""Faults of a Redis Cluster under load (RELIABILITY T30): a master killed
and its replica promoted, a slot moved while workers use it, script caches
emptied, and a partition count changed between deployments.

A test that kills a node starts a cluster of its own (3 masters, 3 replicas,
``appendonly yes``); the others use the session's, emptied. The load tests
run, in this process, a producer and two consumers (each a broker of its
own: separate connections, as two worker processes have). A consumer's
effect is a follow-on message committed with the ack, so the oracle is the
cluster itself read from outside: every job whose publish was acknowledged
has exactly one follow-on (missing 0, double 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

import brokers
from brokers import BrokerError, Message, Subscription
from brokers.options import parse_url
from brokers.redis_keys import Keys
from choreo import Event
from choreo.errors import BrokerUnavailable
from choreo.testing import run_apps
from tests import ledger
from tests.redis_cluster import RedisCluster
from tests.test_network_faults import Producer, drained
from tests.test_operations_doc import documented_rules
from tests.worker_process import WorkerProcess

pytestmark = pytest.mark.redis

JOBS = Subscription("cluster.job", "cluster.work")
DONE = Subscription("cluster.done", "cluster.check")
QUERY = "?visibility_timeout=1&claim_interval=0.2"


@pytest.fixture
def shared(redis_cluster: RedisCluster) -> RedisCluster:
    """The session's cluster, emptied: for the faults that kill no node."""
    redis_cluster.flush()
    return redis_cluster


@pytest.fixture
def cluster() -> Iterator[RedisCluster]:
    """A cluster of its own, for the faults that kill a node."""
    instance = RedisCluster(appendonly=True)
    try:
        instance.start()
        yield instance
    finally:
        instance.stop()


async def consume(url: str, name: str, stop: asyncio.Event, limit: int = 20) -> None:
    """Handle jobs until told to stop: the effect is a ``cluster.done`` message
    committed with the ack, under an id derived from the job's."""
    broker = brokers.from_url(url)
    await broker.connect()
    try:
        await broker.subscribe([JOBS])
        while not stop.is_set():
            try:
                taken = await broker.fetch(name, [JOBS], limit=limit, timeout=0.2)
            except BrokerError:
                await asyncio.sleep(0.1)
                continue
            for delivery in taken:
                done = [] if delivery.duplicate else [
                    Message(DONE.topic, f"done-{delivery.message_id}", delivery.body)]
                with contextlib.suppress(BrokerError):  # not acked: redelivered after the lease
                    await broker.commit(delivery, publish=done)
    finally:
        await broker.close()


async def run_with_fault(
    url: str, jobs: int, fault: Callable[[], Awaitable[None]], *, limit: int = 20
) -> tuple[set[str], Counter[str]]:
    """Publish ``jobs`` jobs (each retried until acknowledged) while two
    consumers work (fetching up to ``limit`` at a time); run ``fault``
    halfway; wait until the work is done. Returns the acknowledged job ids
    and the follow-ons per job."""
    producer = brokers.from_url(url)
    await producer.connect()
    await producer.subscribe([JOBS, DONE])
    stop = asyncio.Event()
    consumers = [asyncio.create_task(consume(url, f"c{i}", stop, limit)) for i in range(2)]
    acked: set[str] = set()
    try:
        for n in range(jobs):
            if n == jobs // 2:
                await fault()
            job = f"job-{n}"
            deadline = time.monotonic() + 30
            while True:
                try:
                    await producer.publish([Message(JOBS.topic, job, job.encode(), key=f"tx-{n}")])
                    acked.add(job)
                    break
                except BrokerError:
                    assert time.monotonic() < deadline, "publishing stayed refused for 30 s"
                    await asyncio.sleep(0.05)
            await asyncio.sleep(0.002)
        done: Counter[str] = Counter()
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            try:
                history = await producer.history()
            except BrokerError:
                await asyncio.sleep(0.2)
                continue
            done = Counter(e.message_id.removeprefix("done-") for e in history
                           if e.topic == DONE.topic and e.message_id is not None)
            if acked <= set(done):
                break
            await asyncio.sleep(0.2)
        return acked, done
    finally:
        stop.set()
        await asyncio.gather(*consumers, return_exceptions=True)
        await producer.close()


def check(acked: set[str], done: Counter[str]) -> None:
    missing = sorted(acked - set(done))
    double = sorted(job for job, count in done.items() if count > 1)
    assert (missing, double) == ([], []), f"missing {len(missing)}: {missing[:5]}, double {len(double)}: {double[:5]}"


async def test_a_master_killed_mid_run_loses_no_acknowledged_job(cluster: RedisCluster) -> None:
    """kill -9 of a master: its replica takes over, the clients follow, every
    acknowledged job is handled exactly once."""
    victim = cluster.master_ports()[0]

    async def kill() -> None:
        cluster.node(victim).kill()

    acked, done = await run_with_fault(cluster.url + QUERY, 400, kill)
    check(acked, done)
    assert victim not in cluster.master_ports() and len(cluster.master_ports()) == 3


async def test_a_master_frozen_past_its_failover_loses_nothing_with_replicas(cluster: RedisCluster) -> None:
    """SIGSTOP of a master for 3 s: its replica takes over meanwhile, and when
    it wakes it still answers the commands queued for it, as a master, before
    it learns it was replaced; what it accepts then is dropped when it rejoins
    as a replica (without ``replicas`` a run here lost 1 of 400 acknowledged
    jobs that way). With ``?replicas=1`` such a commit is refused, since no
    replica follows the old master any more, and retried: nothing is lost."""
    victim = cluster.node(cluster.master_ports()[0])

    async def freeze() -> None:
        victim.pause()
        asyncio.get_running_loop().call_later(3.0, victim.resume)

    acked, done = await run_with_fault(cluster.url + QUERY + "&replicas=1", 400, freeze)
    check(acked, done)
    assert victim.port not in cluster.master_ports()


async def test_a_slot_moved_mid_run_loses_nothing(shared: RedisCluster) -> None:
    """A partition's slot moves key by key to another master while it is in
    use (MOVED, ASK, TRYAGAIN): nothing is lost or doubled, no key is split."""
    keys = Keys("choreo", 16)
    busiest = keys.partition_of(JOBS.topic)  # the jobs all carry keys, but the follow-ons land here too
    slot = _slot(shared, keys.root(busiest))
    moved: list[int] = []

    async def migrate() -> None:
        source = shared.owner(slot)
        target = next(p for p in shared.master_ports() if p != source)
        moved.append(await asyncio.to_thread(shared.migrate, slot, target, pause=0.1))

    acked, done = await run_with_fault(shared.url + QUERY, 400, migrate)
    check(acked, done)
    assert moved and moved[0] > 0


async def test_script_caches_emptied_mid_run(shared: RedisCluster) -> None:
    """Every node's script cache emptied (a restart does that): NOSCRIPT is
    answered by loading the script, once, and the run goes on."""

    async def flush_scripts() -> None:
        for port in shared.master_ports():
            shared.node(port).command("SCRIPT", "FLUSH")

    acked, done = await run_with_fault(shared.url + QUERY, 200, flush_scripts)
    check(acked, done)


async def test_a_master_slow_to_answer_keeps_no_work_waiting_for_a_lease(shared: RedisCluster) -> None:
    """A master that answers late (paused past a fetch's wait for it, again
    and again) while fetches go on calling its other partitions: every late
    reply is handed out, none waits for its lease to expire (60 s here,
    longer than the test may take)."""
    slow = shared.master_ports()[0]
    pauses: list[asyncio.Task[None]] = []

    async def pause_repeatedly() -> None:
        for _ in range(8):
            await asyncio.to_thread(shared.node(slow).command, "CLIENT", "PAUSE", "300", "ALL")
            await asyncio.sleep(0.5)

    async def start_pausing() -> None:
        pauses.append(asyncio.create_task(pause_repeatedly()))

    # A small limit: each fetch calls a few partitions in rotation, so a later
    # fetch calls the slow master's other partitions while it still owes a reply.
    acked, done = await run_with_fault(shared.url + "?visibility_timeout=60&claim_interval=0.2", 300,
                                       start_pausing, limit=3)
    await asyncio.gather(*pauses)
    check(acked, done)


async def test_a_changed_partition_count_is_refused(shared: RedisCluster) -> None:
    """The partition count is part of the layout: a broker counting otherwise
    refuses to start and says what to do."""
    first = brokers.from_url(shared.url + "?partitions=16")
    await first.connect()
    await first.close()
    other = brokers.from_url(shared.url + "?partitions=8")
    with pytest.raises(BrokerError, match=r"partitions=16 .* this broker has partitions=8"):
        await other.connect()
    again = brokers.from_url(shared.url + "?partitions=8&prefix=fresh")
    await again.connect()  # a new prefix is a new layout
    await again.close()


def _slot(cluster: RedisCluster, key: str) -> int:
    port = cluster.master_ports()[0]
    return int(cluster.node(port).command("CLUSTER", "KEYSLOT", key).decode().strip())


def children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (the worker processes of ``--workers``)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


class RetryingProducer(Producer):
    """``Producer``, resending a batch the broker refused (during a failover)
    until it is acknowledged: a batch that did land before its reply was lost
    is there twice, which consumers dedupe."""

    async def _run(self) -> None:
        while not self._stop.is_set():
            events = [Event(type="lab.job", data={"job": f"j{len(self.jobs) + i}"}) for i in range(self.batch)]
            while True:
                try:
                    await self.env.runtime.commit([(e, None) for e in events])
                    break
                except BrokerUnavailable:
                    await asyncio.sleep(0.1)
            self.jobs += [e.data["job"] for e in events]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.every)


async def test_worker_processes_share_a_cluster_through_worker_and_master_kills(cluster: RedisCluster) -> None:
    """``choreo worker --workers 2`` on a cluster while jobs flow: one worker
    process killed (its supervisor starts another), then one master: every
    acknowledged job takes effect once, across both processes."""
    url = cluster.url + "?visibility_timeout=1&claim_interval=0.25&max_deliveries=20"
    worker = WorkerProcess("tests.apps.lab:app", "--broker", url, "--workers", "2").start(count=2)
    try:
        async with run_apps(broker=url) as env:
            async with RetryingProducer(env) as producer:
                await asyncio.sleep(1.5)
                assert worker.process is not None
                os.kill(children(worker.process.pid)[0], signal.SIGKILL)
                await asyncio.sleep(1.5)
                cluster.node(cluster.master_ports()[1]).kill()
                await asyncio.sleep(3.0)
            await drained(url, producer.jobs, timeout=30)
            report = ledger.check(producer.jobs, ledger.effects_in_redis(url))
        assert report.ok, report
        assert len(producer.jobs) >= 200
    finally:
        worker.terminate()


async def test_the_documented_least_privilege_user_runs_on_a_cluster(redis_cluster: RedisCluster) -> None:
    """The ACL of docs/operations.md plus its three Redis Cluster commands is
    all a worker needs on a cluster: connect, subscribe, publish, fetch, commit."""
    redis_cluster.flush()
    page = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    extra = re.search(r"ACL SETUSER choreo-worker (\+cluster.*)", page)
    assert extra is not None, "no Redis Cluster ACL line in docs/operations.md"
    rules = [*documented_rules(), *shlex.split(extra.group(1))]
    for port in redis_cluster.master_ports():
        redis_cluster.node(port).command("ACL", "SETUSER", *rules)
    url = redis_cluster.url.replace("://", "://choreo-worker:s3cret@")
    broker = brokers.from_url(url)
    await broker.connect()
    try:
        await broker.subscribe([JOBS])
        await broker.publish([Message(JOBS.topic, "acl-1", b"x", key="tx")])
        (delivery,) = await broker.fetch("c", [JOBS], limit=5, timeout=2)
        assert await broker.commit(delivery) is brokers.CommitStatus.OK
    finally:
        await broker.close()


async def test_with_replicas_a_commit_is_acknowledged_only_once_a_replica_has_it(cluster: RedisCluster) -> None:
    """``?replicas=1``: a publish returns once the master's replica has it
    (WAIT); with that replica gone it fails, saying so, while a broker
    without the option still publishes."""
    keys = Keys("choreo", 16)
    master = cluster.owner(_slot(cluster, keys.root(keys.partition_of("tx-w"))))
    replica = next(n for n in cluster.nodes
                   if n.port != master and f"master_port:{master}".encode() in n.command("INFO", "replication"))
    waiting = brokers.from_url(cluster.url + "?replicas=1")
    plain = brokers.from_url(cluster.url)
    await waiting.connect()
    await plain.connect()
    try:
        await waiting.publish([Message(JOBS.topic, "w-1", b"x", key="tx-w")])
        replica.kill()
        with pytest.raises(BrokerError, match="not confirmed by its replicas"):
            await waiting.publish([Message(JOBS.topic, "w-2", b"x", key="tx-w")])
        await plain.publish([Message(JOBS.topic, "w-3", b"x", key="tx-w")])
    finally:
        await waiting.close()
        await plain.close()


def test_cluster_options_need_a_cluster_url() -> None:
    """partitions and replicas are refused on plain Redis, where there is one
    partition and no WAIT-based commit; a cluster URL takes them."""
    for option in ("partitions=4", "replicas=1"):
        with pytest.raises(BrokerError, match="needs a redis\\+cluster://"):
            parse_url(f"redis://127.0.0.1:6379/0?{option}")
    scheme, options = parse_url("rediss+cluster://u:p@10.0.0.1:7000,10.0.0.2:7000/?partitions=4&replicas=1")
    assert (scheme, options.partitions, options.replicas) == ("rediss+cluster", 4, 1)
    for bad in ("partitions=0", "replicas=0", "db=1"):
        with pytest.raises(BrokerError):
            parse_url(f"redis+cluster://10.0.0.1:7000/?{bad}")
