"""Reading on Redis Cluster: ``fetch`` over every partition.

Each partition has its own streams, and one FETCH call reads one partition:
a fetch sends the calls of up to ``limit`` partitions (in rotation, each
with a share of ``limit``) as one cluster pipeline, which redis-py splits
into one round trip per node, sent concurrently; partitions that filled
their share are read again while there is room. A blocking XREAD cannot
span slots, so while nothing arrives it polls, backing off from 2 ms to
50 ms. On a single Redis server ``RedisFetch.fetch`` is used unchanged.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from redis import exceptions as rexc

from brokers.base import BrokerError, Delivery, Subscription
from brokers.redis_fetch import _DELAYED_POLL, _TRIM_INTERVAL, RedisFetch
from brokers.redis_support import Stream, is_transient

__all__ = ("PartitionedFetch",)

#: Seconds between polls of an idle Redis Cluster: the first, and the longest.
_POLL_FIRST = 0.002
_POLL_MAX = 0.05


class PartitionedFetch(RedisFetch):
    """``RedisFetch`` with the Redis Cluster path of ``fetch``."""

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
        by_partition: dict[int, list[Stream]] = {}
        for s in streams:
            by_partition.setdefault(s.partition, []).append(s)
        partitions = sorted(by_partition)
        pause, unread = _POLL_FIRST, len(partitions)
        while True:
            # Never more than ``limit`` in all: each chosen partition gets a share.
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
                if self._client is None:
                    return []  # closed while waiting
                cause = exc.__cause__ if isinstance(exc, BrokerError) and exc.__cause__ else exc
                if not is_transient(cause):
                    if isinstance(exc, rexc.RedisError):
                        raise BrokerError(f"fetch failed on {self.url}: {type(exc).__name__}: {exc}") from exc
                    raise
                await self._outage.pause(cause, deadline - time.monotonic())
                return []
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
        calls, shares = [], []
        for i, p in enumerate(chosen):
            share = limit // len(chosen) + (1 if i < limit % len(chosen) else 0)
            shares.append(share)
            args, _ = self._fetch_args(consumer, by_partition[p], share, max_size, now, True)
            move_delayed = now >= self._partition_delayed.get(p, 0.0)
            args[3] = int(move_delayed)
            calls.append((p, args, move_delayed))
        script = self._scripts["FETCH"]
        replies: list[Any] = [rexc.NoScriptError()] * len(calls)
        for attempt in range(2):
            # Resent after NOSCRIPT (a node restarted, or a replica promoted:
            # its script cache is empty): only the calls that did not run.
            again = [i for i, r in enumerate(replies) if isinstance(r, rexc.NoScriptError)]
            if not again:
                break
            if attempt:
                await self._redis().script_load(script.script)
            pipe = self._redis().pipeline(transaction=False)
            for i in again:
                route = self.keys.route(calls[i][0])
                pipe.execute_command("EVALSHA", script.sha, len(route), *route, *calls[i][1])
            for i, reply in zip(again, await pipe.execute(raise_on_error=False), strict=True):
                replies[i] = reply
        found: list[Delivery] = []
        failed: Exception | None = None
        full = []
        for (p, _, move_delayed), share, reply in zip(calls, shares, replies, strict=True):
            if isinstance(reply, Exception):
                failed = failed or reply
                continue
            if move_delayed:
                next_due = reply[5]
                soon = _DELAYED_POLL if next_due < 0 else min(_DELAYED_POLL, next_due / 1000)
                self._partition_delayed[p] = time.monotonic() + soon
            got = (await self._fetch_reply(consumer, by_partition[p], reply, False))[0]
            found += got
            if got and len(got) == share:
                full.append(p)
        if failed is not None and not found:
            raise failed
        return found, full if found and len(found) < limit else []
