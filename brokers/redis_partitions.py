"""Reading on Redis Cluster: ``fetch`` over every partition.

Each partition has its own streams, and one FETCH call reads one partition:
a fetch sends the calls of up to ``limit`` partitions (in rotation, each
with a share of ``limit``) as one cluster pipeline, which redis-py splits
into one round trip per node, sent concurrently; partitions that filled
their share are read again while there is room. A share is at least
``_READ_AT_LEAST`` entries (within ``_OVERREAD`` times ``limit`` in all):
what a round reads past ``limit`` waits in the consumer's spill and goes out
first on the next fetch, as a plain read's surplus does on a single server.
Shares of ``limit`` alone made the calls small: a worker at its defaults
asks for the few slots its handlers just freed, and 16 partitions took 3-4
entries a call, each call costing Redis and the worker about what a dozen
entries do. Measured with ``bench/cluster_scaling.py --chains 20000``,
before and after alternating, two rounds each: script calls per chain 1.30
before, 0.55 after (INFO commandstats); on every cluster row Redis CPU per
chain 27-44% lower, worker CPU per chain 25-39% lower, events/s 1.35-1.64
times. A blocking XREAD cannot
span slots, so while nothing arrives it polls, backing off from 2 ms to
50 ms. On a single Redis server ``RedisFetch.fetch`` is used unchanged.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from redis import exceptions as rexc

from brokers.base import Delivery, Subscription
from brokers.redis_cluster import NOT_RUN, call_script, on_node
from brokers.redis_fetch import _DELAYED_POLL, _TRIM_INTERVAL, RedisFetch, log
from brokers.redis_support import _LOG_EVERY, Stream

__all__ = ("PartitionedFetch",)

#: Seconds between polls of an idle Redis Cluster: the first, and the longest.
_POLL_FIRST = 0.002
_POLL_MAX = 0.05
#: Entries a partition's FETCH call asks for at least (see the module doc),
#: and the most a round may read in all, as a multiple of ``limit``.
_READ_AT_LEAST = 32
_OVERREAD = 4
#: Seconds a fetch waits for the slowest node once it has sent its calls: a
#: node slow or cut off (a network partition) keeps its call in flight, and a
#: later fetch hands out what it returns, while the other nodes' partitions
#: go on being read.
_NODE_GRACE = 0.1


class PartitionedFetch(RedisFetch):
    """``RedisFetch`` with the Redis Cluster path of ``fetch``."""

    #: Fetch calls still on the wire: per task, its node (``host:port``) and
    #: partitions. A node may owe several (a later fetch calls its other
    #: partitions); each reply is handed out by the fetch that finds it done.
    _node_calls: dict[asyncio.Task[list[tuple[int, list[Stream], int, bool, Any]]], tuple[str, list[int]]]
    #: Nodes whose fetch failed while others answered: since when, and when last logged.
    _nodes_down: dict[str, tuple[float, float]]

    async def fetch(
        self,
        consumer: str,
        subscriptions: Sequence[Subscription],
        *,
        limit: int,
        timeout: float,
        max_size: int | None = None,
    ) -> list[Delivery]:
        """Hand out up to ``limit`` deliveries (see ``Transport.fetch``).

        Raises:
            BrokerError: not connected, invalid names, or a configuration
                problem (authentication, ACL permissions).
        """
        if not self.clustered:
            return await super().fetch(consumer, subscriptions, limit=limit, timeout=timeout, max_size=max_size)
        self._redis()
        streams = self._streams(subscriptions)
        if not streams or limit < 1:
            return []
        return await self._fetch_partitions(consumer, streams, limit, max_size, time.monotonic() + timeout)

    # -- Redis Cluster -------------------------------------------------------

    async def _fetch_partitions(
        self, consumer: str, streams: list[Stream], limit: int, max_size: int | None, deadline: float
    ) -> list[Delivery]:
        """``fetch`` on Redis Cluster (see the module doc)."""
        # What a late reply brought beyond an earlier fetch's limit goes first
        # (the consumer's own, for these streams, and young enough to be its lease).
        held = self._spilled(consumer, streams, limit)
        if held:
            return held
        by_partition: dict[int, list[Stream]] = {}
        for s in streams:
            by_partition.setdefault(s.partition, []).append(s)
        partitions = sorted(by_partition)
        pause, unread = _POLL_FIRST, len(partitions)
        while True:
            # Each chosen partition gets a share (see the module doc for the floor).
            start = self._rotation % len(partitions)
            chosen = (partitions[start:] + partitions[:start])[: min(limit, len(partitions))]
            self._rotation += len(chosen)
            try:
                found: list[Delivery] = []
                while chosen:
                    got, chosen = await self._fetch_chosen(consumer, by_partition, chosen, limit - len(found),
                                                           max_size)
                    found += got
                self._outage.ended()
            except Exception as exc:
                return await self._fetch_failed(exc, deadline)
            if found:
                return found
            unread -= len(chosen)
            now = time.monotonic()
            if now >= deadline:
                return []
            if unread <= 0:  # every partition read once and found empty: wait a little
                await asyncio.sleep(min(pause, deadline - now))
                pause, unread = min(_POLL_MAX, pause * 2), len(partitions)

    async def _fetch_chosen(
        self, consumer: str, by_partition: dict[int, list[Stream]], chosen: list[int], limit: int,
        max_size: int | None,
    ) -> tuple[list[Delivery], list[int]]:
        """One round: deliveries from the ``chosen`` partitions, and those that
        filled their share (they may hold more) if there is room for more."""
        now = time.monotonic()
        if self._retention and now >= self._trim_due:
            self._trim_due = now + _TRIM_INTERVAL
            await self.trim()
        # A partition whose node still owes the reply of an earlier call is not called again.
        owed = {p for _, partitions in self._node_calls.values() for p in partitions}
        chosen = [p for p in chosen if p not in owed]
        calls: dict[str, list[tuple[int, list[Stream], int, bool, list[Any]]]] = {}
        nodes: dict[str, Any] = {}
        for i, p in enumerate(chosen):
            share = max(limit // len(chosen) + (1 if i < limit % len(chosen) else 0),
                        min(limit, _READ_AT_LEAST, _OVERREAD * limit // len(chosen)))
            args, _ = self._fetch_args(consumer, by_partition[p], share, max_size, now, True)
            move_delayed = now >= self._partition_delayed.get(p, 0.0)
            args[3] = int(move_delayed)
            node = self._redis().get_node_from_key(self.keys.route(p)[0])
            nodes[node.name] = node
            calls.setdefault(node.name, []).append((p, by_partition[p], share, move_delayed, args))
        for name, node_calls in calls.items():
            task = asyncio.get_running_loop().create_task(
                self._call_node(nodes[name], node_calls, name in self._nodes_down), name="choreo-redis-fetch")
            self._node_calls[task] = (name, [p for p, *_ in node_calls])
        if self._node_calls:
            await asyncio.wait(self._node_calls, timeout=_NODE_GRACE)
        found: list[Delivery] = []
        failed: BaseException | None = None
        full = []
        down: dict[str, BaseException] = {}
        answered = False
        for task, (name, _) in list(self._node_calls.items()):
            if not task.done():
                continue  # a node slow or cut off: its reply is taken by a later fetch
            del self._node_calls[task]
            if task.cancelled() or task.exception() is not None:
                down[name] = task.exception() or rexc.ConnectionError("fetch cancelled")
                continue
            answered = True
            if name in self._nodes_down:
                log.warning("Redis Cluster node %s of %s is reachable again after %.1f s", name, self.url,
                            time.monotonic() - self._nodes_down.pop(name)[0])
            for p, streams, share, move_delayed, reply in task.result():
                if isinstance(reply, Exception):
                    failed = failed or reply
                    continue
                if move_delayed:
                    next_due = reply[5]
                    soon = _DELAYED_POLL if next_due < 0 else min(_DELAYED_POLL, next_due / 1000)
                    self._partition_delayed[p] = time.monotonic() + soon
                got = (await self._fetch_reply(consumer, streams, reply, False))[0]
                found += got
                if got and len(got) == share:
                    full.append(p)
        if down and not answered and not found:
            raise next(iter(down.values()))  # no node answered: the broker's outage backoff
        for name, exc in down.items():
            self._note_down(name, exc)
        if failed is not None and not found:
            raise failed
        # A late reply may bring more than this fetch has room for: the rest waits for the next.
        if len(found) > limit:
            self._keep_spill(consumer, found, limit)
            return found, []
        return found, [p for p in full if p in chosen] if found and len(found) < limit else []

    def _note_down(self, name: str, exc: BaseException) -> None:
        """Log a node that did not answer while others did: once, then every 30 s."""
        now = time.monotonic()
        since, logged = self._nodes_down.get(name, (now, -_LOG_EVERY))
        if now - logged >= _LOG_EVERY:
            logged = now
            log.warning("Redis Cluster node %s of %s is unreachable for %.0f s (%s: %s); the partitions it serves "
                        "wait, the others are read on", name, self.url, now - since, type(exc).__name__, exc)
        self._nodes_down[name] = (since, logged)

    async def _call_node(
        self, node: Any, calls: list[tuple[int, list[Stream], int, bool, list[Any]]], down: bool,
    ) -> list[tuple[int, list[Stream], int, bool, Any]]:
        """The FETCH calls of partitions on ``node``, written at once
        (``on_node``); their replies (an exception for a call that failed).
        Calls that did not run there (a slot moved or moving, a script cache
        emptied) go again as a pipeline of the cluster client, which follows
        the redirections.

        A node that is ``down`` is probed call by call instead: a cluster
        pipeline that meets a connection error closes every connection of the
        client (redis-py resets the whole slot map), which would fail the
        commits and fetches under way on the healthy nodes each time.
        """
        script = self._scripts["FETCH"]
        replies: list[Any]
        if down:
            replies = list(await asyncio.gather(*[
                call_script(self._redis(), self.keys, p, script.script, script.sha, args)
                for p, _, _, _, args in calls], return_exceptions=True))
            lost = next((r for r in replies if isinstance(r, rexc.ConnectionError | rexc.TimeoutError)), None)
            if lost is not None:
                raise lost
        else:
            replies = await on_node(node, [("EVALSHA", script.sha, len(route), *route, *args)
                                           for route, args in ((self.keys.route(p), args) for p, *_, args in calls)])
        for _ in range(2):
            # Only the calls that did not run; after NOSCRIPT (a node restarted,
            # or a replica promoted: its script cache is empty) with the script loaded.
            again = [i for i, r in enumerate(replies) if isinstance(r, NOT_RUN)]
            if not again:
                break
            if any(isinstance(replies[i], rexc.NoScriptError) for i in again):
                await self._redis().script_load(script.script)
            pipe = self._redis().pipeline(transaction=False)
            for i in again:
                route = self.keys.route(calls[i][0])
                pipe.execute_command("EVALSHA", script.sha, len(route), *route, *calls[i][4])
            for i, reply in zip(again, await pipe.execute(raise_on_error=False), strict=True):
                replies[i] = reply
        return [(p, streams, share, move_delayed, reply)
                for (p, streams, share, move_delayed, _), reply in zip(calls, replies, strict=True)]
