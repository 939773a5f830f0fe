"""One lease renewal round of a worker holding many slow handlers: the
leases renewed one by one (``extend`` per delivery, as the runtime did) and
all at once (``extend_many``, as it does), in the same run, on a local
redis-server directly and behind a TCP proxy adding latency.

    python bench/lease_renewal.py [--leases 500] [--repeat 5] [--latency 0.001]

Starts its own redis-server on a free port (no persistence) and the fault
proxy of the tests (``tests/fault_proxy.py``; ``--latency`` seconds each
way, per chunk). Publishes ``--leases`` messages, fetches them all as one
consumer, then renews every lease ``--repeat`` times each way, alternating.
Per round: wall time and the EVALSHA calls Redis served (``INFO
commandstats``), each way, and their medians.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import redis

import brokers
from brokers import Delivery, Message, Subscription
from tests.fault_proxy import FaultProxy
from tests.redis_server import RedisServer

SUB = Subscription("bench.held", "bench.slow")


def evalsha_calls(client: Any) -> int:
    return int(client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))


async def one_by_one(broker: brokers.Broker, held: list[Delivery]) -> None:
    for delivery in held:
        assert await broker.extend(delivery)


async def all_at_once(broker: brokers.Broker, held: list[Delivery]) -> None:
    assert all(await broker.extend_many(held))


async def measure(label: str, url: str, args: argparse.Namespace, stats: Any) -> None:
    broker = brokers.from_url(f"{url}?visibility_timeout=600")
    await broker.connect()
    try:
        await broker.subscribe([SUB])
        await broker.publish([Message(SUB.topic, f"{label}-{i}", b"x") for i in range(args.leases)])
        held: list[Delivery] = []
        while len(held) < args.leases:
            held += await broker.fetch("bench", [SUB], limit=args.leases - len(held), timeout=1)
        rounds: dict[str, list[tuple[float, int]]] = {"one by one": [], "extend_many": []}
        for _ in range(args.repeat):
            for way, renew in (("one by one", one_by_one), ("extend_many", all_at_once)):
                calls = evalsha_calls(stats)
                started = time.perf_counter()
                await renew(broker, held)
                rounds[way].append((time.perf_counter() - started, evalsha_calls(stats) - calls))
        print(f"{label}, {args.leases} leases:")
        for way, figures in rounds.items():
            per_round = ", ".join(f"{s * 1000:.1f} ms/{n} calls" for s, n in figures)
            print(f"  {way}: median {statistics.median(s for s, _ in figures) * 1000:.1f} ms a round,"
                  f" {statistics.median(n for _, n in figures):.0f} EVALSHA calls a round (per round: {per_round})")
        for delivery in held:
            await broker.commit(delivery)
    finally:
        await broker.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--leases", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--latency", type=float, default=0.001, help="seconds each way through the proxy")
    args = parser.parse_args()
    server = RedisServer()
    server.start()
    proxy = FaultProxy(server.port).start()
    stats = redis.Redis(port=server.port)
    try:
        await measure("direct", server.url, args, stats)
        proxy.latency = args.latency
        await measure(f"behind {args.latency * 1000:g} ms each way", f"redis://127.0.0.1:{proxy.port}/0", args, stats)
    finally:
        stats.close()
        proxy.stop()
        server.stop()


if __name__ == "__main__":
    asyncio.run(main())
