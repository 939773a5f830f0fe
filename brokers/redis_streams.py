"""The Redis Streams adapter (Redis 7.0 or later, through ``redis.asyncio``).

Keys: ``brokers.redis_keys.Keys`` names every key (the table is there). A
topic is a stream; each subscription is a consumer group of the same name on
it, created at the end (``$``); entry fields are ``id`` (the producer's
message id) and ``body``. Messages with ``Message.group`` set (retries,
replays) go to the group's private stream of the topic, whose group is created
at ``0``, so no other group sees them. Delayed messages wait in a sorted set
scored by due time (server unix ms), each member a JSON header ``[topic,
group, id]``, a newline, then the body; whichever worker fetches moves due
members to their stream in one script. Dead letters are a stream with fields
``topic group message_id body reason deliveries dead_at``. A dedupe record is
a string key with ``PX = dedupe_ttl`` written in the same script as the ack
(about 90 bytes per record with key overhead). State is a hash ``{v: value,
n: version}`` per key plus a sorted set (all scores 0) indexing the keys, so
``list_state`` is a lex range.

Delivery: ``fetch`` runs one script that (on timers) moves due delayed messages
and XAUTOCLAIMs entries idle past ``visibility_timeout``, then XREADGROUPs
every subscription's streams, dead-letters unreadable entries and entries past
``max_deliveries``, and acks duplicates of settled ids. When that reads every
stream to its end it also reports each stream's last id; then, unless a timer
is due, the next wait needs no script of its own: one XREAD BLOCK over all the
streams from those tails, on a dedicated connection, pipelined with the same
script (without the timed work), which Redis runs the moment the XREAD
returns. Nothing that arrives in between is missed, and a delivery that
trickles in costs one round trip. ``Delivery.entry_id`` is the stream entry
id, prefixed with ``p:`` for entries of a private stream.

Commit is one fenced script: it checks with XPENDING that the consumer still
holds the entry with the same delivery count (XACK has no owner check; a
reclaim bumps the count), checks every state version, and only then writes.
Commits made while others are on the wire are sent together as one call of
the batch script, which checks and applies each of them on its own (one that
is refused or fails leaves the others alone). The operations side (retention,
state listing, backlog, dead letters) is in ``brokers.redis_admin``.

Retention: streams are never trimmed with MAXLEN on XADD. With ``maxlen`` set,
``trim`` (run periodically from ``fetch``) removes the oldest entries down to
about ``maxlen`` with XTRIM MINID, bounded by every group's oldest pending
entry and last-delivered id, so an entry still pending or not yet delivered in
any group is never trimmed. Without ``maxlen`` nothing is trimmed.

Least privilege: a worker needs only its prefix's keys and these commands
(scripts run under the caller's ACL too); ``CONFIG`` is optional (without it
the start-up durability check is skipped)::

    ACL SETUSER worker on >password resetkeys ~choreo:* resetchannels -@all +ping +hello
      +evalsha +eval +script|load +multi +exec +time +exists +del +set
      +hget +hset +hmget +zadd +zrem +zrange +zrangebyscore +zrangebylex +xadd +xack
      +xautoclaim +xclaim +xdel +xgroup|create +xinfo|groups +xlen +xpending +xrange
      +xrevrange +xread +xreadgroup +xtrim

The inspection methods (``choreo trace``, ``dlq``) also use ``+scan
+xinfo|groups +xpending +xrange +zrange +time``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from redis import exceptions as rexc

from brokers import redis_admin
from brokers import redis_scripts as lua
from brokers.base import (
    DEAD_LETTER_KEPT,
    BrokerError,
    CommitStatus,
    Delivery,
    Message,
    StateWrite,
    Subscription,
    check_name,
    log_dead_letter,
    new_delivery,
)
from brokers.messages import Start
from brokers.options import BrokerOptions, parse_url, redact_url
from brokers.redis_keys import Keys
from brokers.redis_lines import Line, ScriptBatcher, run_script, wait_then_fetch
from brokers.redis_support import (
    PRIVATE_TAG,
    Outage,
    Stream,
    check_server,
    is_transient,
    open_clients,
    redis_url,
    slot,
    text,
)

__all__ = ("RedisStreamsBroker",)

log = logging.getLogger("brokers.redis")

#: Seconds between looks at the delayed set when no due time is known.
_DELAYED_POLL = 0.1
#: Seconds between retention sweeps (only with ``maxlen``).
_TRIM_INTERVAL = 5.0
_STATUS = {
    b"ok": CommitStatus.OK, b"lease_lost": CommitStatus.LEASE_LOST, b"conflict": CommitStatus.CONFLICT,
    b"duplicate": CommitStatus.DUPLICATE,
}


class RedisStreamsBroker(redis_admin.RedisAdmin):
    """A ``Broker`` on Redis Streams consumer groups (see the module doc).

    Args:
        url: ``redis://[user:password@]host:port/db`` or ``rediss://`` (TLS,
            certificates verified). redis-py query options pass through;
            choreo's delivery options are read from ``options``.
        options: Delivery options; parsed from ``url`` when omitted.
    """

    def __init__(self, url: str, *, options: BrokerOptions | None = None) -> None:
        if options is None:
            _, options = parse_url(url)
        self.options = options
        self.url = redact_url(url)
        self.visibility_timeout = options.visibility_timeout
        self.max_deliveries = options.max_deliveries
        #: Consumer groups recreated after NOGROUP (stream or group gone).
        self.group_recoveries = 0
        self._redis_url = redis_url(url)
        #: The key layout under ``options.prefix``.
        self.keys = Keys(options.prefix)
        self._dedupe_ms = max(1, round(options.dedupe_ttl * 1000))
        self._client: Any | None = None
        self._reader: Any | None = None
        #: Connections for waiting fetches: one per concurrent ``fetch`` (usually one).
        self._lines: list[Line] = []
        self._scripts: dict[str, Any] = {}
        self._commits: ScriptBatcher | None = None
        self._fetch_sha = ""
        self._claim_due: dict[str, float] = {}
        self._cursors: dict[str, str] = {}
        self._rotation = 0
        self._delayed_due = 0.0
        self._trim_due = 0.0
        self._known: dict[str, Stream] = {}
        self._published_topics: set[str] = set()
        #: Stream tails from the last read that drained these streams.
        self._drained: dict[frozenset[str], dict[str, str]] = {}
        self._outage = Outage(log, self.url)

    # -- lifecycle -----------------------------------------------------------

    async def connect(self) -> None:
        """Open connections, ping, and warn if Redis is not set up as a database.

        Raises:
            BrokerError: Redis is unreachable or refuses the credentials.
        """
        if self._client is not None:
            return
        client, reader = await open_clients(self._redis_url, self.url)
        self._client, self._reader = client, reader
        sources = {"FETCH": lua.FETCH, "EXTEND": lua.EXTEND, "REPLAY": redis_admin.REPLAY,
                   "BACKLOG": redis_admin.BACKLOG, "LIST_STATE": redis_admin.LIST_STATE, "TRIM": redis_admin.TRIM}
        # Rendered once here: the scripts name their keys with this layout's functions.
        self._scripts = {name: client.register_script(lua.render(self.keys, source))
                         for name, source in sources.items()}
        self._commits = ScriptBatcher(client, lua.render(self.keys, lua.COMMIT_BATCH))
        self._fetch_sha = self._scripts["FETCH"].sha
        await check_server(client, self.url, log)

    async def close(self) -> None:
        """Close both connection pools. Idempotent."""
        client, reader = self._client, self._reader
        self._client = self._reader = None
        if self._commits is not None:
            await self._commits.close()
            self._commits = None
        lines, self._lines = self._lines, []
        for line in lines:
            await line.close()
        for each in (reader, client):
            if each is not None:
                await each.aclose()

    def _redis(self) -> Any:
        if self._client is None:
            raise BrokerError(f"broker {self.url} is not connected: await connect() first")
        return self._client

    async def _run(self, script: str, args: Sequence[Any]) -> Any:
        self._redis()
        try:
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
            out.append(Stream(keys.stream(sub.topic), sub.topic, sub.group, False))
            out.append(Stream(keys.private_stream(sub.group, sub.topic), sub.topic, sub.group, True))
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

    async def subscribe(self, subscriptions: Sequence[Subscription]) -> None:
        """Create the groups (topic stream where ``start`` says, private stream at ``0``)."""
        streams = self._streams(subscriptions)
        starts = {s: sub.start for sub in subscriptions for s in self._streams([sub]) if not s.private}
        try:
            await self._create_groups(streams, starts)
        except rexc.RedisError as exc:
            raise BrokerError(f"cannot create consumer groups on {self.url}: {exc}") from exc

    # -- publishing and committing -------------------------------------------

    async def publish(self, messages: Sequence[Message]) -> None:
        """Publish all messages in one script (all or none)."""
        if messages:
            await self.commit(publish=messages)

    async def commit(
        self,
        delivery: Delivery | None = None,
        *,
        publish: Sequence[Message] = (),
        dead_letter: str | None = None,
        state: Sequence[StateWrite] = (),
        done: bool = True,
    ) -> CommitStatus:
        """Settle a delivery and apply its effects in one fenced script."""
        if dead_letter is not None and delivery is None:
            raise BrokerError("a dead letter needs the delivery it records")
        located = None if delivery is None else self._locate(delivery)
        args, soonest = lua.commit_args(delivery, located, dead_letter, state, publish, done, self._dedupe_ms)
        for m in publish:
            if m.topic not in self._published_topics:  # a set lookup per message, the key built once
                self._published_topics.add(m.topic)
                key = self.keys.stream(m.topic)
                self._known.setdefault(key, Stream(key, m.topic, "", False))
        if soonest is not None:
            self._delayed_due = min(self._delayed_due, time.monotonic() + soonest)
        commits = self._commits
        if commits is None:
            raise BrokerError(f"broker {self.url} is not connected: await connect() first")
        try:
            reply = await commits.call(args)
        except rexc.RedisError as exc:
            raise BrokerError(f"redis commit failed on {self.url}: {type(exc).__name__}: {exc}") from exc
        return _STATUS[reply]

    def _locate(self, delivery: Delivery) -> tuple[str, str]:
        """The stream key and entry id behind a delivery."""
        if delivery.entry_id.startswith(PRIVATE_TAG):
            key = self.keys.private_stream(delivery.group, delivery.topic)
            return key, delivery.entry_id[len(PRIVATE_TAG):]
        return self.keys.stream(delivery.topic), delivery.entry_id

    async def extend(self, delivery: Delivery) -> bool:
        """Reset the idle time of a delivery this consumer still holds."""
        key, entry = self._locate(delivery)
        args = [key, delivery.group, delivery.consumer, entry, delivery.deliveries]
        return bool(await self._run("EXTEND", args))

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
        # Rotate so that a busy subscription cannot starve the ones after it.
        self._rotation = (self._rotation + 2) % len(streams)
        streams = streams[self._rotation:] + streams[: self._rotation]
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            try:
                # The previous read left every stream drained and no timer is
                # due: wait for new entries straight away (one round trip
                # fewer per hand-out while events trickle in).
                tails = self._drained.pop(slot_set := self._slot_set(streams), None)
                if tails is None or self._timers_due(streams, time.monotonic()):
                    found, tails = await self._fetch_once(consumer, streams, limit, max_size)
                    self._outage.ended()
                    if found:
                        if tails is not None:
                            self._drained[slot_set] = tails
                        return found
                now = time.monotonic()
                if now >= deadline:
                    return []
                if tails is None:
                    continue  # read only duplicates or dead letters, or regrouped: read on
                slots = [self._claim_due[slot(s)] for s in streams]
                wait = min(deadline, self._delayed_due, *slots) - now
                if wait > 0:
                    # Block on XREAD and have the same connection read through
                    # the groups the moment it wakes: one round trip.
                    args, _ = self._fetch_args(consumer, streams, limit, max_size, now, False)
                    reply = await wait_then_fetch(self._free_line(), tails, wait, self._fetch_sha, args)
                    if reply is not None:
                        found, tails = await self._fetch_reply(consumer, streams, reply, False)
                        if tails is not None:
                            self._drained[slot_set] = tails
                        if found:
                            return found
            except Exception as exc:
                self._drained.clear()
                if self._client is None:
                    return []  # closed while waiting
                # A periodic trim wraps its error like any other call.
                cause = exc.__cause__ if isinstance(exc, BrokerError) and exc.__cause__ else exc
                if not is_transient(cause):
                    if isinstance(exc, rexc.RedisError):
                        raise BrokerError(f"fetch failed on {self.url}: {type(exc).__name__}: {exc}") from exc
                    raise
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
        if now >= self._delayed_due:
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
    ) -> tuple[list[Delivery], dict[str, str] | None]:
        now = time.monotonic()
        args, move_delayed = self._fetch_args(consumer, streams, limit, max_size, now, True)
        if self.options.maxlen is not None and now >= self._trim_due:
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
    ) -> tuple[list[Delivery], dict[str, str] | None]:
        """Deliveries from a FETCH reply, and the stream tails if it drained them."""
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
            found.append(
                new_delivery(
                    s.topic, s.group, consumer, PRIVATE_TAG + entry_id if s.private else entry_id,
                    message_id.decode("utf-8", "replace"), body, count, duplicate == 1,
                )
            )
        drained = {s.key: text(tail) for s, tail in zip(streams, tails, strict=False)} if tails else None
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
