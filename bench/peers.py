"""The 3-hop chain of ``worker_process.py`` on the peer frameworks, measured
the same way and in the same run as choreo's worker process and the raw loop:

    python bench/peers.py [--chains 5000] [--repeat 3] [--publishers 100] [--peers faststream,dramatiq,taskiq]
                          [--quiet-peers]

Each peer runs its own idiomatic worker command at its defaults (the modules
in ``bench/peer_apps/`` say what those are), each handler re-publishing the
next hop, fed by a separate publisher process calling the framework's own
publish or send API from ``--publishers`` concurrent tasks, as choreo's
publisher does. Every side gets the same private redis-server, emptied before
each round, and the sides alternate within each round. Per round and as
medians: handled events/s (three per chain, the clock from the publisher's go
to the last chain's end), worker CPU per chain (the worker's whole process
tree: Dramatiq and taskiq start several processes by default), Redis CPU per
chain, and the ratios to the raw loop of the same round.

The peers are not choreo dependencies: on first use the script makes a
virtualenv of their pinned releases in ``bench/.peers/`` and runs their
workers and publishers with its python.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from chain_redis import PAYLOAD  # this folder, run as a script
from worker_process import Children, Round, choreo_round, descendants, measure, medians, raw_round

from tests.redis_server import RedisServer
from tests.worker_process import ROOT

#: The peers' releases, and the Redis client choreo's own environment uses.
PINS = ("faststream[redis,cli]==0.7.8", "dramatiq[redis]==2.2.1", "taskiq==0.13.0", "taskiq-redis==1.2.4",
        "redis==8.1.0", "hiredis==3.5.0")
VENV = ROOT / "bench" / ".peers" / "venv"
#: Seconds a peer's worker may take to start consuming.
START = 60.0


def peer_bin() -> Path:
    """The peers' virtualenv's bin folder, made (or remade when ``PINS`` changed) on first use."""
    marker = VENV / "pins.txt"
    if not marker.exists() or marker.read_text() != "\n".join(PINS):
        print(f"installing {', '.join(PINS)} into {VENV}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
        done = subprocess.run([str(VENV / "bin" / "python"), "-m", "pip", "install", "-q", *PINS],
                              capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"could not install the peers:\n{done.stderr}")
        marker.write_text("\n".join(PINS))
    return VENV / "bin"


def versions(bin: Path) -> str:
    names = ("faststream", "typer", "dramatiq", "taskiq", "taskiq-redis", "redis", "hiredis")
    script = f"import importlib.metadata as m; print(', '.join(n + ' ' + m.version(n) for n in {names!r}))"
    done = subprocess.run([str(bin / "python"), "-c", script], check=True, capture_output=True, text=True)
    return done.stdout.strip()


def readers(client: redis.Redis) -> int:
    """Connections whose last command was ``XREADGROUP``: a worker reading its streams (Redis 7.0 lists
    a group's consumer only once a read has returned entries, so the groups cannot tell)."""
    return sum(entry.get("cmd") == "xreadgroup" for entry in client.client_list())


@dataclass(frozen=True)
class Peer:
    """How to start a peer's worker, see that it consumes, and count finished chains."""

    argv: Callable[[Path], list[str]]
    ready: Callable[[redis.Redis], bool]
    arrived: Callable[[redis.Redis], int]
    #: Flags that keep the worker from logging each message (``--quiet-peers``).
    quiet: tuple[str, ...] = ()


PEERS = {
    "faststream": Peer(
        lambda bin: [str(bin / "faststream"), "run", "bench.peer_apps.faststream_app:app"],
        # One reading task per subscriber.
        lambda client: readers(client) >= 3,
        lambda client: int(client.xlen("bench.d")),
        # At its default level, INFO, FastStream logs two lines per message; faststream_app logs them at
        # DEBUG when BENCH_QUIET is set (FastStream's --log-level sets the level they are logged at).
        (),
    ),
    "dramatiq": Peer(
        lambda bin: [str(bin / "dramatiq"), "bench.peer_apps.dramatiq_app", "--queues", "bench.a", "bench.b",
                     "bench.c"],
        # One heartbeat per worker process, and Dramatiq starts one per CPU.
        lambda client: int(client.zcard("dramatiq:__heartbeats__")) >= (os.cpu_count() or 1),
        lambda client: int(client.llen("dramatiq:bench.d")),
    ),
    "taskiq": Peer(
        lambda bin: [str(bin / "taskiq"), "worker", "bench.peer_apps.taskiq_app:broker"],
        # taskiq worker starts 2 processes by default.
        lambda client: readers(client) >= 2,
        lambda client: int(client.xlen("bench.d")),
        # At its default level, INFO, taskiq logs a line per task.
        ("--log-level", "WARNING"),
    ),
}


def peer_round(children: Children, name: str, url: str, args: argparse.Namespace, client: redis.Redis,
               bin: Path, spawned: list[int]) -> Round:
    """One round of a peer: its worker until it consumes, then its publisher and the clock."""
    peer = PEERS[name]
    env = {**os.environ, "BENCH_REDIS_URL": url, "PYTHONPATH": str(ROOT)}
    if args.quiet_peers:
        env["BENCH_QUIET"] = "1"
    argv = [*peer.argv(bin), *(peer.quiet if args.quiet_peers else ())]
    with open(VENV.parent / f"{name}.log", "w") as log:
        worker = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    children.started.append(worker)
    deadline = time.monotonic() + START
    while not peer.ready(client):
        if worker.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{name} worker did not start; see {VENV.parent / (name + '.log')}")
        time.sleep(0.05)
    spawned += descendants(worker.pid)
    publisher = children.command([str(bin / "python"), "-m", "bench.peer_apps.publisher", name, str(args.chains),
                                  str(args.publishers), json.dumps(PAYLOAD)], env)
    return measure(client, worker.pid, publisher, lambda: peer.arrived(client), args.chains)


def stop(children: Children, spawned: list[int]) -> None:
    """Stop every process of the round, and any worker process a peer's parent left behind."""
    children.stop()
    for pid in spawned:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    spawned.clear()


def ratios(side: Round, raw: Round) -> str:
    # A few chains can pass within one clock tick of the raw loop's CPU.
    cpu = f"{side.worker_us / raw.worker_us:.2f}x" if raw.worker_us else "(raw CPU under a clock tick) -"
    return f"{side.rate / raw.rate:.3f}x raw events/s, {cpu} raw worker CPU"


def main(args: argparse.Namespace) -> None:
    bin = peer_bin()
    names = ["raw", "choreo", *args.peers]
    print(f"peers: {versions(bin)}")
    print(f"{args.chains:,} chains of 3 hops; {args.publishers} concurrent publishes; every worker at its defaults"
          + ("; peers logging warnings only" if args.quiet_peers else ""))
    server = RedisServer()
    server.start()
    children, spawned = Children(), []
    rounds: dict[str, list[Round]] = {name: [] for name in names}
    try:
        client = redis.Redis.from_url(server.url)
        for number in range(1, args.repeat + 1):
            for name in names:
                client.flushall()
                if name == "raw":
                    result = raw_round(children, server.url, args, client)
                elif name == "choreo":
                    result = choreo_round(children, server.url, args, client)
                else:
                    result = peer_round(children, name, server.url, args, client, bin, spawned)
                stop(children, spawned)
                rounds[name].append(result)
                print(f"round {number}: {name:10} {result.line()}", flush=True)
            raw = rounds["raw"][-1]
            for name in names[1:]:
                print(f"round {number}: {name:10} {ratios(rounds[name][-1], raw)}", flush=True)
        client.close()
    finally:
        stop(children, spawned)
        server.stop()
    middle = medians(rounds)
    for name, median in middle.items():
        print(f"median  {name:10} {median.line()}")
    for name in names[1:]:
        print(f"median  {name:10} {ratios(middle[name], middle['raw'])}")


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chains", type=int, default=5_000, help="chains per side and round (3 events each)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds, the sides alternating; medians reported")
    parser.add_argument("--publishers", type=int, default=100, help="concurrent publishing tasks in each publisher")
    parser.add_argument("--peers", type=lambda text: text.split(","), default=list(PEERS),
                        help="comma-separated, of " + ", ".join(PEERS))
    parser.add_argument("--quiet-peers", action="store_true",
                        help="run FastStream and taskiq at log level WARNING (at their default, INFO, they log "
                             "every message; choreo and Dramatiq do not)")
    args = parser.parse_args()
    if unknown := set(args.peers) - set(PEERS):
        parser.error(f"unknown peers: {', '.join(sorted(unknown))}")
    args.worker_args = ""  # choreo's worker at its defaults, as choreo_round reads it
    return args


if __name__ == "__main__":
    main(arguments())
