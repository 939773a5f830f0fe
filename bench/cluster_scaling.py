"""The 3-hop chain of ``worker_process.py`` on one Redis and on a Redis
Cluster of 1 and 3 masters, with 1 and 2 worker processes, in the same run.

    python bench/cluster_scaling.py [--chains 5000] [--repeat 1] [--publishers 100]

Each setup starts its own servers on free ports (no persistence, no replicas:
what is compared is where the work runs, not durability), then ``choreo
worker bench.process_chain:app --broker URL --workers N`` at its defaults fed
by the choreo publisher process of ``worker_process.py``. The clock runs from
the publisher's go to the last chain's arrival at the end of the chain (on a
cluster: summed over the 16 partitions' streams). Worker CPU is the user+system
time of the worker processes (the supervisor's children with ``--workers 2``),
Redis CPU the sum of ``used_cpu_user + used_cpu_sys`` over the masters; both
per chain. Per setup it prints events/s and the CPU per chain, so that the
cost of partitioning (1 master, cluster layout vs one Redis) and what more
masters and more processes buy on this machine are read off one table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from redis.cluster import ClusterNode
from redis.cluster import RedisCluster as ClusterClient

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from worker_process import Children, cpu_seconds  # this folder, run as a script

from brokers.redis_keys import Keys
from tests.redis_cluster import RedisCluster
from tests.redis_server import RedisServer, free_port

STALL = 60.0


@dataclass
class Setup:
    """Where the chains run: servers started by ``start`` and how many worker processes."""

    name: str
    masters: int  # 0: one plain redis-server
    workers: int


SETUPS = (
    Setup("redis, 1 worker process", 0, 1),
    Setup("redis, 2 worker processes", 0, 2),
    Setup("cluster 1 master, 1 worker process", 1, 1),
    Setup("cluster 3 masters, 1 worker process", 3, 1),
    Setup("cluster 3 masters, 2 worker processes", 3, 2),
)


@dataclass
class Result:
    rate: float
    worker_us: float
    redis_us: float

    def line(self) -> str:
        return (f"{self.rate:8,.0f} events/s  worker CPU {self.worker_us:6.1f} us/chain  "
                f"Redis CPU {self.redis_us:6.1f} us/chain")


class Servers:
    """One redis-server or a cluster, with what a measurement reads from it."""

    def __init__(self, masters: int) -> None:
        self.single = RedisServer() if masters == 0 else None
        self.cluster = None if masters == 0 else RedisCluster(masters=masters, replicas=0, appendonly=False)

    def __enter__(self) -> Servers:
        if self.single is not None:
            self.single.start()
        else:
            assert self.cluster is not None
            self.cluster.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for each in (self.single, self.cluster):
            if each is not None:
                each.stop()

    @property
    def url(self) -> str:
        return self.single.url if self.single is not None else self.cluster.url  # type: ignore[union-attr]

    def clients(self) -> list[redis.Redis]:
        ports = [self.single.port] if self.single is not None else self.cluster.master_ports()  # type: ignore[union-attr]
        return [redis.Redis(port=port) for port in ports]

    def finished(self) -> Callable[[], int]:
        """A function counting the chains that reached their end."""
        if self.single is not None:
            client = redis.Redis(port=self.single.port)
            key = Keys().stream("bench.d")
            return lambda: int(client.xlen(key))
        assert self.cluster is not None
        keys = Keys("choreo", 16)
        nodes = [ClusterNode("127.0.0.1", port) for port in self.cluster.master_ports()]
        cluster: Any = ClusterClient(startup_nodes=nodes)
        streams = [keys.stream("bench.d", p) for p in range(keys.count)]
        return lambda: sum(int(cluster.xlen(key)) for key in streams)


def redis_cpu(clients: list[redis.Redis]) -> float:
    return sum(float(c.info("cpu")["used_cpu_user"]) + float(c.info("cpu")["used_cpu_sys"]) for c in clients)


def worker_pids(parent: int, workers: int) -> list[int]:
    if workers == 1:
        return [parent]
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            found.append(int(stat.parent.name))
    return found


def run_setup(setup: Setup, args: argparse.Namespace) -> Result:
    children = Children()
    with Servers(setup.masters) as servers:
        try:
            worker = children.worker("bench.process_chain:app", "--broker", servers.url,
                                     "--metrics-port", str(free_port()), "--workers", str(setup.workers))
            assert worker.process is not None
            if setup.workers > 1:
                worker.wait_for("running", 60, setup.workers)
            pids = worker_pids(worker.process.pid, setup.workers)
            publisher = children.role("choreo-publisher", "--url", servers.url, "--chains", str(args.chains),
                                      "--publishers", str(args.publishers))
            clients, finished = servers.clients(), servers.finished()
            worker_before, redis_before = sum(map(cpu_seconds, pids)), redis_cpu(clients)
            assert publisher.stdin is not None
            start = time.perf_counter()
            publisher.stdin.write("go\n")
            publisher.stdin.flush()
            done, progress = 0, time.monotonic()
            while done < args.chains:
                time.sleep(0.05)
                arrived = finished()
                if arrived > done:
                    done, progress = arrived, time.monotonic()
                elif time.monotonic() - progress > STALL:
                    raise SystemExit(f"{setup.name}: stalled at {done} of {args.chains} chains")
            elapsed = time.perf_counter() - start
            worker_cpu = sum(map(cpu_seconds, pids)) - worker_before
            server_cpu = redis_cpu(clients) - redis_before
            return Result(args.chains * 3 / elapsed, worker_cpu / args.chains * 1e6, server_cpu / args.chains * 1e6)
        finally:
            children.stop()


def main(args: argparse.Namespace) -> None:
    print(f"{args.chains:,} chains of 3 hops per setup and round; {args.publishers} concurrent publishes; "
          f"{os.cpu_count()} cores; choreo worker at its defaults, metrics on")
    results: dict[str, list[Result]] = {s.name: [] for s in SETUPS}
    for number in range(1, args.repeat + 1):
        for setup in SETUPS:
            results[setup.name].append(run_setup(setup, args))
            print(f"round {number}: {setup.name:40} {results[setup.name][-1].line()}", flush=True)
    if args.repeat > 1:
        for name, rounds in results.items():
            median = Result(*(statistics.median(getattr(r, f) for r in rounds)
                              for f in ("rate", "worker_us", "redis_us")))
            print(f"median  {name:40} {median.line()}")


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chains", type=int, default=5_000, help="chains per setup and round (3 events each)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds over every setup; medians reported")
    parser.add_argument("--publishers", type=int, default=100, help="concurrent publishing tasks")
    return parser.parse_args()


if __name__ == "__main__":
    main(arguments())
