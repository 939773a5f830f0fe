"""The effect ledger: the oracle of the reliability tests (RELIABILITY rule 12).

A lab job (``tests.apps.lab``) has exactly one committed effect: the
``lab.done`` event its handler emits, which the worker publishes in the same
fenced commit as the ack. The ledger counts those effects per job, read from
the broker's own record of them (the ``lab.done`` stream on Redis, the
published events in memory), and compares them with the jobs that were
acknowledged to the producer:

* ``missing``: jobs with no effect (an acknowledged event was lost);
* ``double``: jobs with more than one effect (a redelivery took effect twice).

Executions (how many times a handler body ran, at least once by design) are
counted separately, from the append-only file the lab handler writes, so a
test can show that its fault really caused redeliveries.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import attrs
import redis
from redis.cluster import ClusterNode, RedisCluster

from brokers.redis_keys import Keys
from choreo.middleware import Middleware

DONE = "lab.done"


@attrs.frozen
class Report:
    """What the ledger found. ``ok`` is the pass criterion: 0 missing, 0 double."""

    expected: int
    effects: int
    missing: tuple[str, ...]
    double: dict[str, int]
    unexpected: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.missing and not self.double and not self.unexpected

    def __str__(self) -> str:
        return (
            f"expected {self.expected}, effects {self.effects}, missing {len(self.missing)} "
            f"{list(self.missing[:5])}, double {len(self.double)} {dict(list(self.double.items())[:5])}, "
            f"unexpected {len(self.unexpected)}"
        )


def check(expected: Iterable[str], effects: Counter[str]) -> Report:
    """Compare the jobs that must each take effect once with the effects seen."""
    wanted = set(expected)
    return Report(
        expected=len(wanted),
        effects=sum(effects.values()),
        missing=tuple(sorted(job for job in wanted if effects[job] == 0)),
        double={job: n for job, n in sorted(effects.items()) if n > 1},
        unexpected=tuple(sorted(job for job in effects if job not in wanted)),
    )


def job_of(body: bytes | str | dict[str, Any]) -> str:
    """The job key an effect belongs to (``data.job`` of the event)."""
    event = body if isinstance(body, dict) else json.loads(body)
    return str(event["data"]["job"])


def effects_in_redis(url: str, topic: str = DONE, prefix: str = "choreo") -> Counter[str]:
    """Count effects per job from the stream of ``topic``.

    Streams are never trimmed in these tests, so every committed effect is there.
    """
    return Counter(str(data["job"]) for data in effect_data_in_redis(url, topic, prefix))


def streams_of(url: str, topic: str, prefix: str = "choreo") -> tuple[Any, list[str]]:
    """A client for the Redis (or Redis Cluster) of ``url``, and the keys of
    ``topic``'s streams there (one per partition on a cluster)."""
    base, _, query = url.partition("?")
    if not base.startswith(("redis+cluster://", "rediss+cluster://")):
        return redis.Redis.from_url(base), [Keys(prefix).stream(topic)]
    options = dict(part.split("=", 1) for part in query.split("&") if part)
    keys = Keys(prefix, int(options.get("partitions", 16)))
    hosts = base.split("://", 1)[1].rstrip("/").rpartition("@")[2]
    nodes = [ClusterNode(host.rpartition(":")[0], int(host.rpartition(":")[2])) for host in hosts.split(",")]
    return RedisCluster(startup_nodes=nodes), [keys.stream(topic, p) for p in range(keys.count)]


def flush(url: str) -> None:
    """Empty the Redis (every master of a Redis Cluster) of ``url``."""
    client, _ = streams_of(url, DONE)
    try:
        if isinstance(client, RedisCluster):
            client.flushall(target_nodes=RedisCluster.PRIMARIES)
        else:
            client.flushall()
    finally:
        client.close()


def keep_effects(url: str, topic: str = DONE, prefix: str = "choreo") -> None:
    """Give the effect streams a consumer group that never reads, so retention
    (``maxlen``), which trims only what every group is done with, keeps it all."""
    client, keys = streams_of(url, topic, prefix)
    try:
        for key in keys:
            client.xgroup_create(key, "ledger.keep", id="0", mkstream=True)
    finally:
        client.close()


def effect_data_in_redis(url: str, topic: str = DONE, prefix: str = "choreo") -> Iterator[dict[str, Any]]:
    """The data of every event on the streams of ``topic``, read in pages."""
    client, keys = streams_of(url, topic, prefix)
    try:
        for key in keys:
            start = "-"
            while True:
                page = client.xrange(key, min=start, count=10_000)
                for _, fields in page:
                    yield json.loads(fields[b"body"])["data"]
                if len(page) < 10_000:
                    break
                ms, seq = page[-1][0].decode().split("-")
                start = f"{ms}-{int(seq) + 1}"
    finally:
        client.close()


def effects_in_events(events: Iterable[Any], topic: str = DONE) -> Counter[str]:
    """Count effects per job from published ``choreo.Event`` objects."""
    return Counter(str(e.data["job"]) for e in events if e.type == topic)


def executions(path: Path, pid: int | None = None) -> Counter[str]:
    """How many times the lab handler body began, per job (at least once
    each); only in process ``pid`` if given."""
    if not path.exists():
        return Counter()
    counts: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        kind, job, by = line.split()
        if kind == "start" and (pid is None or int(by) == pid):
            counts[job] += 1
    return counts


class Recorder(Middleware):
    """Counts committed effects per job in this process (``on_publish`` runs only after a commit)."""

    def __init__(self, topic: str = DONE) -> None:
        self.topic = topic
        self.counts: Counter[str] = Counter()

    def on_publish(self, event: Any) -> None:
        if event.type == self.topic:
            self.counts[str(event.data["job"])] += 1
