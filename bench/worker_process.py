"""A 3-hop chain (A -> B -> C -> D) as users run it: a ``choreo worker``
process at its default settings against a raw redis-py loop process, each fed
by a publisher process of its own, measured in the same run.

    python bench/worker_process.py [--chains 20000] [--repeat 3] [--publishers 100] [--worker-args "--concurrency 200"]

Starts its own redis-server on a free port (no persistence, so disk speed
does not enter). Each round runs both sides on an emptied server, raw first:

- choreo: ``python -m choreo worker bench.process_chain:app --broker URL
  --metrics-port PORT`` plus ``--worker-args``, fed by a process that runs an
  ``App`` with no routes (``choreo.run``) and calls ``app.publish`` from
  ``--publishers`` concurrent tasks, one event at a time;
- raw: ``chain_redis.RawLoop`` in a process of its own (XREADGROUP COUNT 100
  over the streams, JSON decode and encode per hop, one pipeline of XADDs and
  XACKs per read; Python's collector set up as ``choreo worker`` sets it), fed
  by ``publish_redis.RawPublisher`` with as many concurrent tasks (their XADDs
  pipelined, one flush per round trip).

Each publisher starts, connects, then waits for the go: the clock runs from
the go to the last D entry's arrival on its stream, and handled events count
three per chain. Worker CPU is the worker process's user+system time over
that span (``/proc/<pid>/stat``), Redis CPU the server's ``used_cpu_user +
used_cpu_sys`` (``INFO cpu``); both per chain. Per round and as medians it
prints each side's figures, the publisher's seconds and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from chain_redis import PAYLOAD, RawLoop  # this folder, run as a script
from publish_redis import RawPublisher, split

from brokers.redis_keys import Keys
from choreo import App, run
from choreo.supervisor import WORKER_GC_THRESHOLD, tune_collector
from tests.redis_server import RedisServer, free_port
from tests.worker_process import ROOT, WorkerProcess

#: Where each side's chains end: choreo's streams are under its key prefix.
LAST = {"raw": "bench.d", "choreo": Keys().stream("bench.d")}
#: Seconds a round may go without a chain finishing before it is abandoned.
STALL = 60.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# -- the child processes ---------------------------------------------------------


async def raw_worker(url: str) -> None:
    """The raw loop until SIGTERM; says ``ready`` once its groups exist."""
    tune_collector(WORKER_GC_THRESHOLD)
    loop = RawLoop(url, terminal=False)
    await loop.setup()
    task = asyncio.create_task(loop.run())
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    print("ready", flush=True)
    await stopping.wait()
    await loop.stop(task)
    await loop.client.aclose()


async def raw_publisher(url: str, chains: int, tasks: int) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    await client.ping()
    publisher = RawPublisher(client)

    async def publish(count: int) -> None:
        for n in range(count):
            await publisher.publish("bench.a", {**PAYLOAD, "n": n})

    await go()
    start = time.perf_counter()
    await asyncio.gather(*(publish(count) for count in split(chains, tasks)))
    print(f"{time.perf_counter() - start:.3f}", flush=True)
    await client.aclose()


async def choreo_publisher(url: str, chains: int, tasks: int) -> None:
    # The server's no-persistence warning is meant for deployments, not this run.
    logging.disable(logging.WARNING)
    app = App("bench-publisher")
    async with run(app, broker=url):

        async def publish(count: int) -> None:
            for n in range(count):
                await app.publish("bench.a", {**PAYLOAD, "n": n})

        await go()
        start = time.perf_counter()
        await asyncio.gather(*(publish(count) for count in split(chains, tasks)))
        print(f"{time.perf_counter() - start:.3f}", flush=True)


async def go() -> None:
    """Say ``ready``, then wait for the line that starts the clock."""
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


ROLES = ("raw-worker", "raw-publisher", "choreo-publisher")


# -- the parent ------------------------------------------------------------------


class Children:
    """Every process a round starts, stopped by pid however the round ends."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[str]] = []
        self.workers: list[WorkerProcess] = []

    def role(self, role: str, *args: str) -> subprocess.Popen[str]:
        """One of ``ROLES`` in a fresh interpreter, once it has said ``ready``."""
        return self.command([sys.executable, __file__, "--role", role, *args])

    def command(self, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        """A process that says ``ready`` on stdout, once it has."""
        process = subprocess.Popen(argv, cwd=ROOT, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self.started.append(process)
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        if line != "ready":
            raise SystemExit(f"{argv[:4]} did not start (exit {process.wait()}, said {line!r})")
        return process

    def worker(self, *args: str) -> WorkerProcess:
        worker = WorkerProcess(*args)
        self.workers.append(worker)
        return worker.start(timeout=60)

    def stop(self) -> None:
        for process in self.started:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        for worker in self.workers:
            if worker.process is not None and worker.process.poll() is None:
                try:
                    worker.terminate()
                except AssertionError:
                    worker.kill()
        self.started.clear()
        self.workers.clear()


@dataclass
class Round:
    """One side's figures for one round."""

    rate: float
    worker_us: float
    redis_us: float
    publisher_s: float
    #: ``INFO commandstats`` deltas per chain: command -> (calls, microseconds).
    commands: dict[str, tuple[float, float]] = field(default_factory=dict)

    def line(self) -> str:
        return (f"{self.rate:9,.0f} events/s  worker CPU {self.worker_us:6.1f} us/chain  "
                f"Redis CPU {self.redis_us:6.1f} us/chain  publisher {self.publisher_s:6.2f} s")

    def breakdown(self, top: int = 8) -> str:
        """The commands Redis spent the most time in, per chain (a script's own
        line includes the commands it called, which are also listed)."""
        ranked = sorted(self.commands.items(), key=lambda item: -item[1][1])[:top]
        return "  ".join(f"{name} {calls:.2f}x {usec:.1f}us" for name, (calls, usec) in ranked)


def medians(rounds: dict[str, list[Round]]) -> dict[str, Round]:
    """Each side's median of every figure over its rounds."""
    return {
        name: Round(*(statistics.median(getattr(r, attr) for r in side)
                      for attr in ("rate", "worker_us", "redis_us", "publisher_s")))
        for name, side in rounds.items()
    }


def cpu_seconds(pid: int) -> float:
    """User plus system CPU a process has used (Linux)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def descendants(pid: int) -> list[int]:
    """The live processes under ``pid``, children before their own (Linux)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as children:
                for child in map(int, children.read().split()):
                    found += [child, *descendants(child)]
        except FileNotFoundError:
            continue
    return found


def tree_cpu_seconds(pid: int) -> float:
    """CPU of a process and of its live descendants: the workers of a peer
    that starts several processes by default count together."""
    total = cpu_seconds(pid)
    for child in descendants(pid):
        try:
            total += cpu_seconds(child)
        except FileNotFoundError:  # exited since it was listed
            continue
    return total


def redis_cpu(client: redis.Redis) -> float:
    cpu = client.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def command_stats(client: redis.Redis) -> dict[str, tuple[int, int]]:
    """Calls and microseconds per command since the server started."""
    return {name.removeprefix("cmdstat_"): (int(stat["calls"]), int(stat["usec"]))
            for name, stat in client.info("commandstats").items()}


def measure(client: redis.Redis, worker_pid: int, publisher: subprocess.Popen[str], last: str | Callable[[], int],
            chains: int) -> Round:
    """Give the publisher its go and wait until ``chains`` entries reached ``last`` (a stream, or a count of
    finished chains for a peer that ends them elsewhere). Worker CPU covers the worker's process tree."""
    arrived_now = last if callable(last) else lambda: int(client.xlen(last))
    assert publisher.stdin is not None and publisher.stdout is not None
    worker_before, redis_before, stats_before = tree_cpu_seconds(worker_pid), redis_cpu(client), command_stats(client)
    start = time.perf_counter()
    publisher.stdin.write("go\n")
    publisher.stdin.flush()
    done, progress = 0, time.monotonic()
    while done < chains:
        time.sleep(0.02)
        arrived = arrived_now()
        if arrived > done:
            done, progress = arrived, time.monotonic()
        elif time.monotonic() - progress > STALL:
            raise SystemExit(f"stalled at {done} of {chains} chains on {last}")
    elapsed = time.perf_counter() - start
    worker_cpu, server_cpu = tree_cpu_seconds(worker_pid) - worker_before, redis_cpu(client) - redis_before
    stats = command_stats(client)
    publisher_s = float(publisher.stdout.readline())
    commands = {name: ((calls - stats_before.get(name, (0, 0))[0]) / chains,
                       (usec - stats_before.get(name, (0, 0))[1]) / chains)
                for name, (calls, usec) in stats.items()}
    return Round(chains * 3 / elapsed, worker_cpu / chains * 1e6, server_cpu / chains * 1e6, publisher_s,
                 {name: delta for name, delta in commands.items() if delta[0] > 0})


def raw_round(children: Children, url: str, args: argparse.Namespace, client: redis.Redis) -> Round:
    worker = children.role("raw-worker", "--url", url)
    publisher = children.role("raw-publisher", "--url", url, "--chains", str(args.chains),
                              "--publishers", str(args.publishers))
    return measure(client, worker.pid, publisher, LAST["raw"], args.chains)


def choreo_round(children: Children, url: str, args: argparse.Namespace, client: redis.Redis) -> Round:
    worker = children.worker("bench.process_chain:app", "--broker", url, "--metrics-port", str(free_port()),
                             *shlex.split(args.worker_args))
    assert worker.process is not None
    publisher = children.role("choreo-publisher", "--url", url, "--chains", str(args.chains),
                              "--publishers", str(args.publishers))
    return measure(client, worker.process.pid, publisher, LAST["choreo"], args.chains)


def main(args: argparse.Namespace) -> None:
    server = RedisServer()
    server.start()
    children = Children()
    rounds: dict[str, list[Round]] = {"raw": [], "choreo": []}
    try:
        client = redis.Redis.from_url(server.url)
        print(f"redis-py {redis.__version__}; {args.chains:,} chains of 3 hops; {args.publishers} concurrent "
              f"publishes; choreo worker {args.worker_args or 'at its defaults'}, metrics on")
        for number in range(1, args.repeat + 1):
            for name, side in (("raw", raw_round), ("choreo", choreo_round)):
                client.flushall()
                rounds[name].append(side(children, server.url, args, client))
                children.stop()
                print(f"round {number}: {name:6} {rounds[name][-1].line()}", flush=True)
                if args.commands:
                    print(f"         per chain: {rounds[name][-1].breakdown()}", flush=True)
            raw, choreo = rounds["raw"][-1], rounds["choreo"][-1]
            print(f"round {number}: ratio choreo/raw {choreo.rate / raw.rate:.2f} events/s, "
                  f"{choreo.worker_us / raw.worker_us:.2f}x worker CPU, "
                  f"{choreo.redis_us / raw.redis_us:.2f}x Redis CPU", flush=True)
        client.close()
    finally:
        children.stop()
        server.stop()
    middle = medians(rounds)
    for name, median in middle.items():
        print(f"median  {name:6} {median.line()}")
    raw, choreo = middle["raw"], middle["choreo"]
    print(f"ratio choreo/raw (medians): {choreo.rate / raw.rate:.2f} events/s, "
          f"{choreo.worker_us / raw.worker_us:.2f}x worker CPU per chain, "
          f"{choreo.redis_us / raw.redis_us:.2f}x Redis CPU per chain")


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chains", type=int, default=20_000, help="chains per side and round (3 events each)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds, raw and choreo alternating; medians reported")
    parser.add_argument("--publishers", type=int, default=100, help="concurrent publishing tasks in each publisher")
    parser.add_argument("--worker-args", default="", help='extra flags for choreo worker, e.g. "--concurrency 200"')
    parser.add_argument("--commands", action="store_true",
                        help="also print the commands Redis spent the most time in (INFO commandstats), per chain")
    parser.add_argument("--role", choices=ROLES, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    options = arguments()
    if options.role is None:
        main(options)
    elif options.role == "raw-worker":
        asyncio.run(raw_worker(options.url))
    else:
        publisher = raw_publisher if options.role == "raw-publisher" else choreo_publisher
        asyncio.run(publisher(options.url, options.chains, options.publishers))
