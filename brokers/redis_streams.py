"""The Redis Streams adapter (Redis 7.0 or later, through ``redis.asyncio``).

Keys: ``brokers.redis_keys.Keys`` names every key (the table is there). A
topic is a stream; each subscription is a consumer group of the same name on
it, created where ``Subscription.start`` says (by default at ``0`` on a
stream no group reads yet, at ``$`` beside other groups); entry fields are
``id`` (the producer's message id, which must be the event's own) and
``body``. Messages with ``Message.group`` set (retries, replays) go to the
group's private stream of the topic, whose group is created at ``0``, so no
other group sees them. Delayed messages wait in a sorted set scored by due
time (server unix ms), each member a JSON header ``[topic, group, id]``, a
newline, then the body; whichever worker fetches moves due members to their
stream in one script. Dead letters are a stream with fields ``topic group
message_id body reason deliveries dead_at`` (plus ``size sha1`` when only the
first bytes of an oversized entry are kept). Dedupe records are fields of a
hash per group and bucket (``Keys.seen``), written in the same script as the
ack; a group's head hash (``Keys.seen_head``) names its current bucket. A
bucket takes ids until it holds ``dedupe_max / 2`` or is ``dedupe_ttl`` old;
when the next one begins, the one before the current is deleted, so a group
keeps at most ``dedupe_max`` records, each at least ``dedupe_ttl`` unless
that count bound drops it sooner, and buckets expire ``2 * dedupe_ttl``
after their last write. State is a hash ``{v: value, n:
version}`` per key plus a sorted set (all scores 0) indexing the keys, so
``list_state`` is a lex range.

Reading (groups, ``fetch``) is in ``brokers.redis_fetch`` and, between
timers, ``brokers.redis_reads`` (XREADGROUP from the client); on Redis
Cluster in ``brokers.redis_partitions``.

Redis Cluster (``redis+cluster://``, ``rediss+cluster://``): the same keys
in ``partitions`` hash tags, through redis-py's cluster client (see
``brokers.redis_cluster``). A commit settling a delivery runs in that
delivery's partition; one made outside a delivery in the partition of its
first message with a key (choreo sets it to the correlation id), else of
its first state key, else of its first message's topic (so keyless messages
of one topic keep their order). Messages published outside a delivery and
without state go each to its own key's partition, so that a copy published
again lands with the first and is deduped. Entry ids handed out start with ``<partition>:``.

Commit is one fenced script: it checks with XPENDING that the consumer still
holds the entry with the same delivery count (XACK has no owner check; a
reclaim bumps the count), checks every state version, and only then writes.
Commits made while others are on the wire are sent together as one call of
the batch script (``brokers.redis_commit``), which checks and applies each of
them on its own (one that is refused or fails leaves the others alone), with
one XPENDING, one HMGET per dedupe bucket, one XACK and one HSET per stream
or group for the whole batch. Publishes of messages due now need no check
and go out as plain XADDs in the same write. The operations side (retention,
state listing, backlog, dead letters) is in ``brokers.redis_admin``.

Retention is on by default: streams are never trimmed with MAXLEN on XADD;
``trim`` (run every few seconds from ``fetch``) removes with XTRIM MINID the
entries past a stream's newest ``maxlen`` (default ``DEFAULT_MAXLEN`` in
``brokers.redis_retention``) and those older than ``retention`` (default one
day), bounded by every group's oldest pending entry and last-delivered id, so
an entry still pending or not yet delivered in any group is never trimmed.
``maxlen=0&retention=0`` turns it off (``connect`` warns: memory then grows
without bound).

Least privilege: a worker needs only its prefix's keys and these commands
(scripts run under the caller's ACL too); ``CONFIG`` is optional (without it
the start-up durability check is skipped)::

    ACL SETUSER worker on >password resetkeys ~choreo:* resetchannels -@all +ping +hello
      +evalsha +eval +script|load +multi +exec +time +del
      +hget +hset +hmget +hdel +hlen +pexpire +zadd +zrem +zrange +zrangebyscore +zrangebylex +xadd +xack
      +xautoclaim +xclaim +xdel +xgroup|create +xinfo|groups +xlen +xpending +xrange
      +xrevrange +xread +xreadgroup +xtrim

``choreo trace`` also needs ``+scan``; docs/operations.md gives a read-only
user for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from redis import exceptions as rexc

from brokers import redis_admin, redis_commit, redis_retention
from brokers import redis_scripts as lua
from brokers.base import (
    BrokerError,
    CommitStatus,
    Delivery,
    Message,
    StateWrite,
    Subscription,
    check_name,
)
from brokers.options import CLUSTER_SCHEMES, BrokerOptions, parse_url, redact_url
from brokers.redis_cluster import (
    DEFAULT_PARTITIONS,
    ClusterBatcher,
    check_cluster_server,
    check_partitions,
    open_cluster,
)
from brokers.redis_dead_letters import REPLAY, RedisDeadLetters
from brokers.redis_keys import Keys
from brokers.redis_leases import EXTEND, RedisLeases
from brokers.redis_lines import ScriptBatcher
from brokers.redis_partitions import PartitionedFetch
from brokers.redis_reads import BURY, MARK
from brokers.redis_support import (
    PRIVATE_TAG,
    Outage,
    Stream,
    check_server,
    open_clients,
    redis_url,
    untag_entry,
)

__all__ = ("RedisStreamsBroker",)

log = logging.getLogger("brokers.redis")

_STATUS = {
    b"ok": CommitStatus.OK, b"lease_lost": CommitStatus.LEASE_LOST, b"conflict": CommitStatus.CONFLICT,
    b"duplicate": CommitStatus.DUPLICATE,
}


class RedisStreamsBroker(PartitionedFetch, RedisDeadLetters, RedisLeases):
    """A ``Broker`` on Redis Streams consumer groups (see the module doc).

    Args:
        url: ``redis://[user:password@]host:port/db`` or ``rediss://`` (TLS,
            certificates verified); for Redis Cluster
            ``redis+cluster://[user:password@]host:port[,host:port...]/`` or
            ``rediss+cluster://``. redis-py query options pass through;
            choreo's delivery options are read from ``options``.
        options: Delivery options; parsed from ``url`` when omitted.
    """

    def __init__(self, url: str, *, options: BrokerOptions | None = None) -> None:
        scheme, parsed = parse_url(url)
        if options is None:
            options = parsed
        self.options = options
        self.url = redact_url(url)
        self.visibility_timeout = options.visibility_timeout
        self.max_deliveries = options.max_deliveries
        self.group_recoveries = 0
        self._redis_url = redis_url(url)
        self.clustered = scheme in CLUSTER_SCHEMES
        #: The key layout under ``options.prefix``.
        try:
            self.keys = Keys(options.prefix, options.partitions or DEFAULT_PARTITIONS if self.clustered else None)
        except ValueError as exc:
            raise BrokerError(str(exc)) from None
        # 0 turns dedupe off (nothing recorded); any other ttl is at least 1 ms.
        self._dedupe_ms = max(1, round(options.dedupe_ttl * 1000)) if options.dedupe_ttl > 0 else 0
        self._client = None
        self._reader = None
        self._lines = []
        self._scripts = {}
        self._commits: ScriptBatcher | None = None
        self._cluster_commits: ClusterBatcher | None = None
        self._fetch_sha = ""
        self._claim_due = {}
        self._cursors = {}
        self._rotation = 0
        self._delayed_due = 0.0
        self._trim_due = 0.0
        self._retention = any(redis_retention.retention_bounds(options))
        self._published_topics: set[str] = set()
        self._known, self._drained, self._tails, self._spill, self._partition_delayed = {}, {}, {}, {}, {}
        self._node_calls, self._nodes_down = {}, {}
        self._outage = Outage(log, self.url)

    # -- lifecycle -----------------------------------------------------------

    async def connect(self) -> None:
        """Open connections, ping, and warn if Redis is not set up as a database.

        Raises:
            BrokerError: Redis is unreachable or refuses the credentials.
        """
        if self._client is not None:
            return
        if self.clustered:
            client = await open_cluster(self._redis_url, self.url)
            try:
                await check_partitions(client, self.keys, self.url)
            except BaseException:
                await client.aclose()
                raise
            self._client = client
        else:
            client, reader = await open_clients(self._redis_url, self.url)
            self._client, self._reader = client, reader
        sources = {"FETCH": lua.FETCH, "EXTEND": EXTEND, "REPLAY": REPLAY, "MARK": MARK, "READ": lua.READ,
                   "BURY": lua.COMMON + BURY,
                   "BACKLOG": redis_admin.BACKLOG, "LIST_STATE": redis_admin.LIST_STATE, "TRIM": redis_retention.TRIM}
        # Rendered once here: the scripts name their keys with this layout's functions.
        # dedupe_max bounds a group: on a cluster each partition's buckets take an even share.
        cap = max(1, self.options.dedupe_max // (2 * self.keys.count))
        self._scripts = {name: client.register_script(lua.render(self.keys, source, bucket_cap=cap))
                         for name, source in sources.items()}
        commit_batch = lua.render(self.keys, redis_commit.COMMIT_BATCH, bucket_cap=cap)
        self._fetch_sha = self._scripts["FETCH"].sha
        if self.clustered:
            self._cluster_commits = ClusterBatcher(client, self.keys, commit_batch, replicas=self.options.replicas or 0)
            await check_cluster_server(client, self.url, log)
        else:
            self._commits = ScriptBatcher(client, commit_batch)
            await check_server(client, self.url, log)
        if not self._retention:
            log.warning(
                "retention is off on %s (maxlen=0 and retention=0): streams keep every entry and Redis memory "
                "grows without bound; see docs/operations.md, \"Memory per event and sizing\"", self.url,
            )

    async def close(self) -> None:
        """Close both connection pools. Idempotent."""
        client, reader = self._client, self._reader
        self._client = self._reader = None
        if self._commits is not None:
            await self._commits.close()
            self._commits = None
        if self._cluster_commits is not None:
            await self._cluster_commits.close()
            self._cluster_commits = None
        for task in self._node_calls:
            task.cancel()  # a fetch left on the wire to a slow node: what it took is reclaimed
        self._node_calls = {}
        # Spilled deliveries stay pending on the server: reclaimed like a crash's.
        self._spill, self._tails, self._drained = {}, {}, {}
        lines, self._lines = self._lines, []
        for line in lines:
            await line.close()
        for each in (reader, client):
            if each is not None:
                await each.aclose()

    async def subscribe(self, subscriptions: Sequence[Subscription]) -> None:
        """Create the groups (topic stream where ``start`` says, private stream at ``0``)."""
        streams = self._streams(subscriptions)
        # ``_streams`` gives each subscription's topic stream, then its private
        # one, for each partition in turn.
        starts = {s: sub.start for s, sub in zip(streams[::2], list(subscriptions) * self.keys.count, strict=True)}
        try:
            await self._create_groups(streams, starts)
        except rexc.RedisError as exc:
            raise BrokerError(f"cannot create consumer groups on {self.url}: {exc}") from exc

    # -- publishing and committing -------------------------------------------

    async def publish(self, messages: Sequence[Message]) -> None:
        """Publish all messages, all or none.

        Messages due now go out as plain XADDs (in MULTI/EXEC when there are
        several), in the commit batch's write: a publish has nothing to check
        on the server, and a command costs Redis a fraction of a script call.
        Delayed ones take the commit script, which scores them by server time.
        On Redis Cluster every publish takes the commit script, one per
        partition the messages' keys name (see the module doc).
        """
        if not messages:
            return
        if self.clustered or any(m.delay for m in messages):
            await self.commit(publish=messages)
            return
        commands: list[tuple[Any, ...]] = []
        for m in messages:
            check_name("topic", m.topic)
            if m.group is not None:
                check_name("group", m.group)
            if not isinstance(m.body, bytes | bytearray):
                raise BrokerError(f"message {m.id!r} body must be bytes, not {type(m.body).__name__}")
            key = self.keys.stream(m.topic) if m.group is None else self.keys.private_stream(m.group, m.topic)
            self._known.setdefault(key, Stream(key, m.topic, m.group or "", m.group is not None))
            commands.append(("XADD", key, "*", "id", m.id, "body", bytes(m.body)))
        if len(commands) > 1:
            commands = [("MULTI",), *commands, ("EXEC",)]
        batcher = self._commits
        if batcher is None:
            raise BrokerError(f"broker {self.url} is not connected: await connect() first")
        try:
            replies = await batcher.commands(commands)
        except rexc.RedisError as exc:
            raise BrokerError(f"redis publish failed on {self.url}: {type(exc).__name__}: {exc}") from exc
        if len(commands) > 1:  # MULTI's and each XADD's QUEUED, then EXEC's replies (or its error)
            done = replies[-1]
            replies = [*replies[:-1], *(done if isinstance(done, list) else [done])]
        failed = [r for r in replies if isinstance(r, Exception)]
        if failed:
            raise BrokerError(f"redis publish failed on {self.url}: {failed[0]}")

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
        if self.clustered and delivery is None and not state and len(publish) > 1:
            return await self._publish_by_key(publish)
        located = None if delivery is None else self._locate(delivery)
        args, soonest = redis_commit.commit_args(delivery, located, dead_letter, state, publish, done, self._dedupe_ms)
        if self.clustered:
            return await self._commit_in_partition(self._partition(delivery, state, publish), publish, args)
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

    def _partition(self, delivery: Delivery | None, state: Sequence[StateWrite], publish: Sequence[Message]) -> int:
        """Where a commit runs on Redis Cluster: its delivery's partition, else
        its first keyed message's, its first state key's, its first topic's."""
        keys = self.keys
        keyed = next((m.key for m in publish if m.key is not None), None)
        if delivery is not None:
            return self._partition_of(delivery)
        if keyed is not None:
            return keys.partition_of(keyed)
        if state:
            return keys.partition_of(state[0].key)
        return keys.partition_of(publish[0].topic) if publish else 0

    async def _publish_by_key(self, publish: Sequence[Message]) -> CommitStatus:
        """Messages published outside a delivery on Redis Cluster: each in
        the partition of its own key (its topic without one), so that a copy
        published again later lands where the first one did and is deduped.
        One atomic commit per partition; if one fails, the error is raised
        and the others may have been published (publishing again is safe)."""
        groups: dict[int, list[Message]] = {}
        for m in publish:
            groups.setdefault(self.keys.partition_of(m.key if m.key is not None else m.topic), []).append(m)
        if len(groups) == 1:
            (partition, messages), = groups.items()
            args, _ = redis_commit.commit_args(None, None, None, (), messages, True, self._dedupe_ms)
            return await self._commit_in_partition(partition, messages, args)
        # Every group checked (names, bodies) before any is sent.
        ready = [(p, messages, redis_commit.commit_args(None, None, None, (), messages, True, self._dedupe_ms)[0])
                 for p, messages in groups.items()]
        for status in await asyncio.gather(*(self._commit_in_partition(*each) for each in ready)):
            if status is not CommitStatus.OK:
                return status
        return CommitStatus.OK

    async def _commit_in_partition(self, partition: int, publish: Sequence[Message], args: list[Any]) -> CommitStatus:
        """A commit on Redis Cluster, in ``partition`` (see the module doc)."""
        keys = self.keys
        for m in publish:
            key = keys.stream(m.topic, partition)
            self._known.setdefault(key, Stream(key, m.topic, "", False, partition))
            if m.delay:
                due = time.monotonic() + m.delay
                self._partition_delayed[partition] = min(self._partition_delayed.get(partition, due), due)
        commits = self._cluster_commits
        if commits is None:
            raise BrokerError(f"broker {self.url} is not connected: await connect() first")
        try:
            reply = await commits.call(args, partition)
        except rexc.RedisError as exc:
            raise BrokerError(f"redis commit failed on {self.url}: {type(exc).__name__}: {exc}") from exc
        return _STATUS[reply]

    def _partition_of(self, delivery: Delivery) -> int:
        try:
            return untag_entry(self.clustered, delivery.entry_id)[0]
        except ValueError as exc:
            raise BrokerError(f"delivery {delivery.entry_id!r} is not one of {self.url}: {exc}") from None

    def _locate(self, delivery: Delivery) -> tuple[str, str]:
        """The stream key and entry id behind a delivery."""
        partition = self._partition_of(delivery)
        entry_id = untag_entry(self.clustered, delivery.entry_id)[1]
        if entry_id.startswith(PRIVATE_TAG):
            key = self.keys.private_stream(delivery.group, delivery.topic, partition)
            return key, entry_id[len(PRIVATE_TAG):]
        return self.keys.stream(delivery.topic, partition), entry_id
