"""A network partition between a worker and one Redis Cluster master
(RELIABILITY T30): the worker runs in a network namespace of its own, whose
only way to the cluster is a veth pair with one address per node, and a
blackhole route in the namespace cuts it off from one master while the rest
of the cluster (and the producer) still reach it.

What a user cares about: while cut off, the worker goes on handling the
partitions of the masters it still reaches; after the heal, every
acknowledged job has taken effect exactly once (the ledger) and nothing is
left pending. Needs root and ``ip netns``; skipped, saying why, without them.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import pytest
from redis.crc import key_slot

from brokers.redis_keys import Keys
from choreo.testing import run_apps
from tests import ledger
from tests.netns import NetworkNamespace, unavailable
from tests.redis_cluster import RedisCluster
from tests.test_network_faults import Producer, drained
from tests.worker_process import WorkerProcess

pytestmark = pytest.mark.redis

KEYS = Keys("choreo", 16)
OPTIONS = "?visibility_timeout=1&claim_interval=0.25&max_deliveries=20"


@pytest.fixture
def netns() -> Iterator[NetworkNamespace]:
    reason = unavailable()
    if reason is not None:
        pytest.skip(f"a network partition needs a network namespace: {reason}")
    namespace = NetworkNamespace(hosts=6)
    try:
        yield namespace.open()
    finally:
        namespace.close()


@pytest.fixture
def cluster(netns: NetworkNamespace) -> Iterator[RedisCluster]:
    """3 masters and 3 replicas, each node on one of the namespace's host addresses."""
    instance = RedisCluster(appendonly=False, addresses=netns.addresses)
    try:
        instance.start()
        yield instance
    finally:
        instance.stop()


def partitions_of(cluster: RedisCluster, port: int) -> set[int]:
    """The partitions whose slot the master on ``port`` serves."""
    return {p for p in range(KEYS.count) if cluster.owner(key_slot(KEYS.root(p).encode())) == port}


def job_partitions(url: str) -> dict[str, int]:
    """Each published job's partition, read from the ``lab.job`` streams."""
    client, keys = ledger.streams_of(url, "lab.job")
    try:
        return {str(json.loads(fields[b"body"])["data"]["job"]): p
                for p, key in enumerate(keys) for _, fields in client.xrange(key)}
    finally:
        client.close()


def settled(url: str) -> bool:
    """No entry pending or undelivered in any ``lab.job`` stream's groups, private retries included."""
    client, keys = ledger.streams_of(url, "lab.job")
    try:
        for p in range(KEYS.count):
            for key in (keys[p], KEYS.private_stream("lab.work", "lab.job", p)):
                if not client.exists(key):
                    continue
                last = client.xinfo_stream(key)["last-generated-id"]
                for group in client.xinfo_groups(key):
                    if group["pending"] or group["last-delivered-id"] != last:
                        return False
        return True
    finally:
        client.close()


async def test_a_worker_cut_off_from_one_master_works_on_and_loses_nothing(
    netns: NetworkNamespace, cluster: RedisCluster
) -> None:
    """The only worker loses its route to one master for several seconds
    (the master is not failed over: the other nodes still see it). Jobs of
    the other masters' partitions keep taking effect meanwhile; those of the
    cut-off master's wait; after the heal every job takes effect once and
    every group drains."""
    url = cluster.url + OPTIONS
    victim = cluster.master_ports()[0]
    cut_off = partitions_of(cluster, victim)
    worker = WorkerProcess("tests.apps.lab:app", "--broker", url, launcher=netns.command([])).start(timeout=60)
    try:
        async with run_apps(broker=url) as env:
            async with Producer(env) as producer:
                await asyncio.sleep(1.0)
                netns.cut(cluster.host(victim))
                # Counted from a little after the cut: a batch acknowledged just before it may
                # be listed just after, and the worker may have handled it before the cut.
                await asyncio.sleep(0.5)
                first = len(producer.jobs)
                await asyncio.sleep(4.0)
                during = producer.jobs[first:]
                where = job_partitions(url)
                reachable = [job for job in during if where[job] not in cut_off]
                stranded = [job for job in during if where[job] in cut_off]
                assert reachable and stranded, (len(reachable), len(stranded))
                # Work goes on while the partition lasts: every reachable job takes effect.
                await drained(url, reachable, timeout=60)
                effects = ledger.effects_in_redis(url)
                assert not [job for job in stranded if effects[job]], "a job of the cut-off master took effect"
                netns.heal(cluster.host(victim))
                await asyncio.sleep(1.0)
            await drained(url, producer.jobs, timeout=60)
        report = ledger.check(producer.jobs, ledger.effects_in_redis(url))
        assert report.ok, report
        deadline = time.monotonic() + 30
        while not settled(url):
            assert time.monotonic() < deadline, "entries stayed pending or undelivered after the heal"
            await asyncio.sleep(0.2)
    finally:
        worker.kill()
