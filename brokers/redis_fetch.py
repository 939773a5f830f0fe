"""Reading for the Redis Streams adapter: consumer groups and ``fetch``.

``fetch`` runs the ``FETCH`` script when it must learn where the streams
are, or when a timer is due: it moves due delayed messages and XAUTOCLAIMs
entries idle past ``visibility_timeout``, then XREADGROUPs every
subscription's streams. It dead-letters unreadable entries, entries over the
consumer's size limit (keeping their first bytes, size and SHA-1) and entries
past ``max_deliveries``, and reports them for the log; entries whose id was
already settled in the group come back marked as duplicates. When that reads
every stream to its end it also reports each stream's last id. Between
timers ``fetch`` reads without that script (``brokers.redis_reads``): one
XREADGROUP per group from the client, then the duplicate marks; and when
the last read took every stream to its end, one XREAD BLOCK over all the
streams from their tails with the READ script behind it on the same write,
which Redis runs the moment the XREAD returns: it reads, marks duplicates
and dead-letters what cannot be handed out. Nothing that arrives in between
is missed, and a delivery that trickles in costs one round trip.
``Delivery.entry_id`` is the stream entry id, prefixed with ``p:`` for entries
of a private stream.

On Redis Cluster reading is ``brokers.redis_partitions.PartitionedFetch``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from redis import exceptions as rexc

from brokers.base import (
    DEAD_LETTER_KEPT,
    BrokerError,
    Delivery,
    Subscription,
    check_name,
    log_dead_letter,
    new_delivery,
)
from brokers.messages import Start
from brokers.options import BrokerOptions
from brokers.redis_cluster import call_script
from brokers.redis_keys import Keys
from brokers.redis_lines import Line, run_script
from brokers.redis_reads import PlainReads
from brokers.redis_support import PRIVATE_TAG, Outage, Stream, is_transient, slot, tag_entry, text

__all__ = ("RedisFetch",)

log = logging.getLogger("brokers.redis")

#: Seconds between looks at the delayed set when no due time is known.
_DELAYED_POLL = 0.1
#: Seconds between retention sweeps (not with retention off).
_TRIM_INTERVAL = 5.0


class RedisFetch(PlainReads):
    """The reading half of ``RedisStreamsBroker``: its connections and
    scripts are set up there; the state of its reads lives here."""

    url: str
    options: BrokerOptions
    keys: Keys
    #: On Redis Cluster (``redis+cluster://``), through redis-py's cluster client.
    clustered: bool
    #: Per partition, when to look at its delayed set next (Redis Cluster).
    _partition_delayed: dict[int, float]
    max_deliveries: int
    visibility_timeout: float
    #: Consumer groups recreated after NOGROUP (stream or group gone).
    group_recoveries: int
    _client: Any | None
    _reader: Any | None
    _scripts: dict[str, Any]
    _outage: Outage
    _known: dict[str, Stream]
    #: Connections for waiting fetches: one per concurrent ``fetch`` (usually one).
    _lines: list[Line]
    _fetch_sha: str
    _claim_due: dict[str, float]
    _cursors: dict[str, str]
    _rotation: int
    _delayed_due: float
    _trim_due: float
    #: Whether retention is on (``trim`` has a bound to apply).
    _retention: bool
    #: Per set of streams read together: whether the last read took every
    #: stream to its end (then the next one may block); absent: FETCH reads next.
    _drained: dict[frozenset[str], bool]

    async def _run(self, script: str, args: Sequence[Any], partition: int = 0) -> Any:
        """Run one of the scripts registered at ``connect`` in ``partition``."""
        client = self._redis()
        try:
            if self.clustered:
                found = self._scripts[script]
                return await call_script(client, self.keys, partition, found.script, found.sha, args)
            return await self._scripts[script](args=args)
        except rexc.RedisError as exc:
            raise BrokerError(f"redis {script.lower()} failed on {self.url}: {type(exc).__name__}: {exc}") from exc

    # -- streams -------------------------------------------------------------

    def _streams(self, subscriptions: Sequence[Subscription]) -> list[Stream]:
        out: list[Stream] = []
        keys = self.keys
        for sub in subscriptions:
            check_name("topic", sub.topic)
            check_name("group", sub.group)
        for p in range(keys.count):
            for sub in subscriptions:
                out.append(Stream(keys.stream(sub.topic, p), sub.topic, sub.group, False, p))
                out.append(Stream(keys.private_stream(sub.group, sub.topic, p), sub.topic, sub.group, True, p))
        for stream in out:
            self._known.setdefault(stream.key, stream)
        return out

    async def _create_groups(self, streams: Sequence[Stream], starts: Mapping[Stream, Start] | None = None) -> None:
        """Create missing groups: private streams at ``0``, topic streams
        where their start says (``"auto"`` when not given: at ``0`` on a
        stream no group reads yet, at ``$`` beside other groups)."""
        redis = self._redis()
        topics = [s for s in streams if not s.private]
        # Read first, create after: groups created together decide together.
        pipe = redis.pipeline(transaction=False)
        for s in topics:
            pipe.xinfo_groups(s.key)
        read = {s.key: bool(info) and not isinstance(info, Exception)
                for s, info in zip(topics, await pipe.execute(raise_on_error=False), strict=True)}
        pipe = redis.pipeline(transaction=False)
        for s in streams:
            start = "auto" if starts is None else starts.get(s, "auto")
            at_end = start == "end" or (start == "auto" and read.get(s.key, False))
            pipe.xgroup_create(s.key, s.group, id="$" if at_end and not s.private else "0", mkstream=True)
        for result in await pipe.execute(raise_on_error=False):
            if isinstance(result, Exception) and not str(result).startswith("BUSYGROUP"):
                raise result

    # -- fetching ------------------------------------------------------------

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

        Connection trouble (Redis down, loading, busy) is logged once per
        outage and backed off; meanwhile ``fetch`` returns ``[]``.

        Raises:
            BrokerError: not connected, invalid names, or a configuration
                problem (authentication, ACL permissions).
        """
        self._redis()
        streams = self._streams(subscriptions)
        if not streams or limit < 1:
            return []
        spilled = self._spilled(consumer, streams, limit)
        if spilled:
            return spilled
        # Rotate so that a busy subscription cannot starve the ones after it.
        self._rotation = (self._rotation + 2) % len(streams)
        streams = streams[self._rotation:] + streams[: self._rotation]
        deadline = time.monotonic() + max(0.0, timeout)
        slot_set = self._slot_set(streams)
        while True:
            try:
                now = time.monotonic()
                # ``None``: no plain read yet, or it must not go on (a group was
                # recreated, a wake found nothing): FETCH reads and learns the tails.
                drained = self._drained.pop(slot_set, None)
                if drained is None or self._timers_due(streams, now) or (
                        drained and self._block_tails(streams) is None):
                    found, drained = await self._fetch_once(consumer, streams, limit, max_size)
                    self._outage.ended()
                    if drained is not None:
                        self._drained[slot_set] = drained
                    if found:
                        return found
                    if time.monotonic() >= deadline:
                        return []
                    continue  # read on: only duplicates or dead letters, or regrouped, or now drained
                block_ms = 0
                if drained:
                    # Every stream read to its end: wait for new entries on one
                    # XREAD BLOCK from the tails, the reads queued behind it.
                    slots = [self._claim_due[slot(s)] for s in streams]
                    block_ms = int((min(deadline, self._delayed_due, *slots) - now) * 1000)
                    if block_ms < 1:
                        self._drained[slot_set] = drained
                        if now >= deadline:
                            return []
                        continue
                found, drained, woke, missing = await self._read_plain(
                    self._free_line(), consumer, streams, limit, max_size, block_ms)
                self._outage.ended()
                if missing:
                    for s in missing:
                        self._tails.pop(slot(s), None)
                    await self._recover_groups(missing)
                    continue
                if woke and not found and drained:
                    # Woken by entries another consumer of the group took
                    # first: the tails are behind; FETCH learns them again.
                    for s in streams:
                        self._tails.pop(slot(s), None)
                else:
                    self._drained[slot_set] = drained
                if found:
                    return found
                if time.monotonic() >= deadline:
                    return []
            except Exception as exc:
                self._drained.clear()
                self._tails.clear()
                return await self._fetch_failed(exc, deadline)

    async def _fetch_failed(self, exc: Exception, deadline: float) -> list[Delivery]:
        """What a fetch that raised ``exc`` returns: ``[]`` once the broker is
        closed, or after backing off an outage (logged once per outage) until
        ``deadline`` at most.

        Raises:
            BrokerError: ``exc`` is not transient: a Redis error, wrapped.
            Exception: ``exc`` itself, when it is neither transient nor a Redis error.
        """
        if self._client is None:
            return []  # closed while waiting
        # A periodic trim wraps its error like any other call.
        cause = exc.__cause__ if isinstance(exc, BrokerError) and exc.__cause__ else exc
        if not is_transient(cause):
            if isinstance(exc, rexc.RedisError):
                raise BrokerError(f"fetch failed on {self.url}: {type(exc).__name__}: {exc}") from exc
            raise exc
        await self._outage.pause(cause, deadline - time.monotonic())
        return []

    def _free_line(self) -> Line:
        for line in self._lines:
            if not line.busy:
                return line
        assert self._reader is not None
        line = Line(self._reader.connection_pool)
        self._lines.append(line)
        return line

    @staticmethod
    def _slot_set(streams: Sequence[Stream]) -> frozenset[str]:
        return frozenset(slot(s) for s in streams)

    def _timers_due(self, streams: Sequence[Stream], now: float) -> bool:
        if now >= self._delayed_due or (self._retention and now >= self._trim_due):
            return True
        due = self._claim_due
        return any(now >= due.get(slot(s), now) for s in streams)

    def _fetch_args(
        self, consumer: str, streams: list[Stream], limit: int, max_size: int | None, now: float, timers: bool
    ) -> tuple[list[Any], bool]:
        """FETCH's ARGV, and whether it moves delayed messages; without
        ``timers`` it only reads (no delayed moves, no reclaims)."""
        move_delayed = timers and now >= self._delayed_due
        args: list[Any] = [
            consumer, limit, self.max_deliveries, int(move_delayed),
            round(self.visibility_timeout * 1000), max_size or 0, DEAD_LETTER_KEPT,
        ]
        for s in streams:
            key = slot(s)
            claim = timers and now >= self._claim_due.setdefault(key, now)
            if claim:
                self._claim_due[key] = now + self.options.effective_claim_interval
            args += [s.key, s.topic, s.group, int(claim), self._cursors.get(key, "0-0")]
        return args, move_delayed

    async def _fetch_once(
        self, consumer: str, streams: list[Stream], limit: int, max_size: int | None
    ) -> tuple[list[Delivery], bool | None]:
        now = time.monotonic()
        args, move_delayed = self._fetch_args(consumer, streams, limit, max_size, now, True)
        if self._retention and now >= self._trim_due:
            self._trim_due = now + _TRIM_INTERVAL
            await self.trim()
        # On a line of its own, like the waiting fetch: redis-py's command
        # path costs more than the round trip (see ``Line``).
        reply = await run_script(self._free_line(), self._fetch_sha, args, self._load_fetch)
        return await self._fetch_reply(consumer, streams, reply, move_delayed)

    async def _load_fetch(self) -> None:
        await self._redis().script_load(self._scripts["FETCH"].script)

    async def _fetch_reply(
        self, consumer: str, streams: list[Stream], reply: Any, move_delayed: bool
    ) -> tuple[list[Delivery], bool | None]:
        """Deliveries from a FETCH reply, and whether it read every stream to
        its end (then each stream's tail is noted for plain reads); ``None``
        with nothing handed out but something read or a group recreated."""
        out, read_any, missing, cursors, tails, next_due, buried = reply
        for topic, group, entry, reason in buried:
            log_dead_letter(log, text(topic), text(group), text(entry), text(reason))
        for s, cursor in zip(streams, cursors, strict=True):
            self._cursors[slot(s)] = text(cursor)
        if move_delayed:
            soon = _DELAYED_POLL if next_due < 0 else min(_DELAYED_POLL, next_due / 1000)
            self._delayed_due = time.monotonic() + soon
        if missing:
            await self._recover_groups([streams[i - 1] for i in missing])
        found = []
        for index, entry, message_id, body, count, duplicate in out:
            # RESP bulk strings and integers: bytes and int already.
            s = streams[index - 1]
            entry_id = entry.decode()
            if s.private:
                entry_id = PRIVATE_TAG + entry_id
            found.append(
                new_delivery(
                    s.topic, s.group, consumer, tag_entry(self.clustered, s.partition, entry_id),
                    message_id.decode("utf-8", "replace"), body, count, duplicate == 1,
                )
            )
        for s, tail in zip(streams, tails or (), strict=False):
            self._tails[slot(s)] = text(tail)
        drained = bool(tails)
        if found:
            return found, drained
        if read_any or missing:
            return [], None
        return [], drained

    async def _recover_groups(self, streams: Sequence[Stream]) -> None:
        self.group_recoveries += 1
        self._outage.note_nogroup(", ".join(sorted({f"{s.key} ({s.group})" for s in streams})))
        # A lost group (destroyed, or FLUSHALL) lost its position: it goes on
        # from the end rather than replay what its stream still holds.
        await self._create_groups(streams, dict.fromkeys(streams, "end"))
