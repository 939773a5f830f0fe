"""The Redis Streams adapter (Redis 7.0 or later, through ``redis.asyncio``).

Key layout (``<p>`` is ``options.prefix``, default ``choreo``; topics and
groups match ``TOPIC_PATTERN``, so they never start with ``_`` and cannot
collide with the reserved names below):

``<p>:<topic>``
    One stream per topic. Each subscription is a consumer group of the same
    name, created at the end of the stream (``$``). Entry fields: ``id`` (the
    producer's message id) and ``body`` (the bytes).
``<p>:_group:<group>:<topic>``
    The group's private stream for that topic: messages with ``Message.group``
    set (retries, replays) go here, so no other group sees them. Its group is
    created at ``0``, so what was sent before the group existed is delivered.
``<p>:_delayed``
    Sorted set of delayed messages scored by due time (server unix ms). A
    member is a JSON header ``[topic, group, id]``, a newline, then the body;
    whichever worker fetches moves due members to their stream in one script.
``<p>:_dead``
    Dead-letter stream, fields ``topic group message_id body reason
    deliveries dead_at`` (``message_id`` absent if the entry had none).
``<p>:_seen:<group>:<message id>``
    Dedupe record: a string key with ``PX = dedupe_ttl``, written in the same
    script as the ack (about 90 bytes per record with key overhead).
``<p>:_state:<key>`` and ``<p>:_state_keys``
    Versioned state: a hash ``{v: value, n: version}`` per key, and a sorted
    set (all scores 0) indexing the keys so ``list_state`` is a lex range.

Delivery: ``fetch`` runs one script that (on timers) moves due delayed messages
and XAUTOCLAIMs entries idle past ``visibility_timeout``, then XREADGROUPs
every subscription's streams, dead-letters unreadable entries and entries past
``max_deliveries``, and acks duplicates of settled ids. Only when that finds
nothing does it block, with one XREAD on a dedicated connection over all the
streams, from the tails the script reported, so nothing that arrives between
the two is missed. ``Delivery.entry_id`` is the stream entry id, prefixed
with ``p:`` for entries of a private stream.

Commit is one fenced script: it checks with XPENDING that the consumer still
holds the entry with the same delivery count (XACK has no owner check; a
reclaim bumps the count), checks every state version, and only then writes.

Retention: streams are never trimmed with MAXLEN on XADD. With ``maxlen`` set,
``trim`` (run periodically from ``fetch``) removes the oldest entries down to
about ``maxlen`` with XTRIM MINID, bounded by every group's oldest pending
entry and last-delivered id, so an entry still pending or not yet delivered in
any group is never trimmed. Without ``maxlen`` nothing is trimmed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import attrs
import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from brokers import redis_scripts as lua
from brokers.base import (
    TOPIC_PATTERN,
    BrokerError,
    CommitStatus,
    DeadLetterRecord,
    Delivery,
    GroupBacklog,
    Message,
    StateWrite,
    Subscription,
    Versioned,
)
from brokers.options import BrokerOptions, parse_url, redact_url
from brokers.redis_wait import Outage, wait_for_entries

__all__ = ("RedisStreamsBroker",)

log = logging.getLogger("brokers.redis")

_OPTION_NAMES = frozenset(field.name for field in attrs.fields(BrokerOptions))
_PRIVATE = "p:"
#: Seconds between looks at the delayed set when no due time is known.
_DELAYED_POLL = 0.1
#: Seconds between retention sweeps (only with ``maxlen``).
_TRIM_INTERVAL = 5.0
_TRANSIENT = (rexc.ConnectionError, rexc.TimeoutError, rexc.BusyLoadingError, OSError)
_STATUS = {b"ok": CommitStatus.OK, b"lease_lost": CommitStatus.LEASE_LOST, b"conflict": CommitStatus.CONFLICT}


@attrs.frozen
class _Stream:
    key: str
    topic: str
    group: str
    private: bool


def _redis_url(url: str) -> str:
    """The URL for redis-py: choreo's own query options removed."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in _OPTION_NAMES]
    return urlunsplit(parts._replace(query=urlencode(query)))


def _check_name(kind: str, name: str) -> None:
    if not isinstance(name, str) or not TOPIC_PATTERN.match(name):
        raise BrokerError(f"invalid {kind} name {name!r}: letters, digits and ._-: only")


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, rexc.AuthenticationError):
        return False
    if isinstance(exc, _TRANSIENT):
        return True
    return isinstance(exc, rexc.ResponseError) and str(exc).startswith(("BUSY", "LOADING", "MASTERDOWN", "TRYAGAIN"))


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


class RedisStreamsBroker:
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
        self._redis_url = _redis_url(url)
        self._prefix = options.prefix
        self._client: aioredis.Redis | None = None
        self._reader: aioredis.Redis | None = None
        self._scripts: dict[str, Any] = {}
        self._claim_due: dict[str, float] = {}
        self._cursors: dict[str, str] = {}
        self._rotation = 0
        self._delayed_due = 0.0
        self._trim_due = 0.0
        self._known: dict[str, _Stream] = {}
        self._outage = Outage(log, self.url)

    # -- lifecycle -----------------------------------------------------------

    async def connect(self) -> None:
        """Open connections, ping, and warn if Redis is not set up as a database.

        Raises:
            BrokerError: Redis is unreachable or refuses the credentials.
        """
        if self._client is not None:
            return
        common: dict[str, Any] = {"decode_responses": False, "protocol": 2, "socket_connect_timeout": 5.0}
        client = aioredis.from_url(
            self._redis_url, retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2), **common
        )
        # Blocking reads get their own pool; their timeout is enforced per call.
        reader = aioredis.from_url(self._redis_url, retry=Retry(NoBackoff(), 0), socket_timeout=None, **common)
        try:
            await client.ping()
        except Exception as exc:
            await client.aclose()
            await reader.aclose()
            raise BrokerError(f"cannot connect to {self.url}: {type(exc).__name__}: {exc}") from None
        self._client, self._reader = client, reader
        self._scripts = {
            name: client.register_script(getattr(lua, name))
            for name in ("FETCH", "COMMIT", "EXTEND", "REPLAY", "BACKLOG", "LIST_STATE", "TRIM")
        }
        await self._check_server(client)

    async def _check_server(self, client: aioredis.Redis) -> None:
        try:
            appendonly = await client.config_get("appendonly")
            policy = await client.config_get("maxmemory-policy")
        except rexc.ResponseError:
            return  # CONFIG is denied to a least-privilege ACL user: nothing to check
        if appendonly.get(b"appendonly", b"yes") != b"yes":
            log.warning(
                "Redis at %s runs with appendonly no: acknowledged events are lost if it crashes "
                "(set appendonly yes)", self.url,
            )
        value = policy.get(b"maxmemory-policy", b"noeviction")
        if value != b"noeviction":
            log.warning(
                "Redis at %s runs with maxmemory-policy %s: eviction destroys streams and groups "
                "(set maxmemory-policy noeviction)", self.url, value.decode(),
            )

    async def close(self) -> None:
        """Close both connection pools. Idempotent."""
        client, reader = self._client, self._reader
        self._client = self._reader = None
        for each in (reader, client):
            if each is not None:
                await each.aclose()

    def _redis(self) -> aioredis.Redis:
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

    def _streams(self, subscriptions: Sequence[Subscription]) -> list[_Stream]:
        out: list[_Stream] = []
        for sub in subscriptions:
            _check_name("topic", sub.topic)
            _check_name("group", sub.group)
            out.append(_Stream(f"{self._prefix}:{sub.topic}", sub.topic, sub.group, False))
            out.append(_Stream(f"{self._prefix}:_group:{sub.group}:{sub.topic}", sub.topic, sub.group, True))
        for stream in out:
            self._known.setdefault(stream.key, stream)
        return out

    async def _create_groups(self, streams: Sequence[_Stream]) -> None:
        pipe = self._redis().pipeline(transaction=False)
        for s in streams:
            pipe.xgroup_create(s.key, s.group, id="0" if s.private else "$", mkstream=True)
        for result in await pipe.execute(raise_on_error=False):
            if isinstance(result, Exception) and not str(result).startswith("BUSYGROUP"):
                raise result

    async def subscribe(self, subscriptions: Sequence[Subscription]) -> None:
        """Create the groups (main stream at ``$``, private stream at ``0``)."""
        streams = self._streams(subscriptions)
        try:
            await self._create_groups(streams)
        except rexc.RedisError as exc:
            raise BrokerError(f"cannot create consumer groups on {self.url}: {exc}") from exc

    # -- publishing and committing -------------------------------------------

    def _message_args(self, messages: Sequence[Message]) -> list[Any]:
        args: list[Any] = []
        soonest = None
        for m in messages:
            _check_name("topic", m.topic)
            if m.group is not None:
                _check_name("group", m.group)
            if not isinstance(m.body, bytes | bytearray):
                raise BrokerError(f"message {m.id!r} body must be bytes, not {type(m.body).__name__}")
            delay_ms = max(0, round((m.delay or 0.0) * 1000))
            if delay_ms:
                soonest = delay_ms if soonest is None else min(soonest, delay_ms)
            args += [m.topic, m.group or "", m.id, bytes(m.body), delay_ms]
            self._known.setdefault(
                f"{self._prefix}:{m.topic}", _Stream(f"{self._prefix}:{m.topic}", m.topic, "", False)
            )
        if soonest is not None:
            self._delayed_due = min(self._delayed_due, time.monotonic() + soonest / 1000)
        return args

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
        args: list[Any] = [self._prefix]
        if delivery is None:
            args += [0, "", "", "", "", 0, "", 0, 0, 0, "", 0, "", b""]
        else:
            key, entry = self._locate(delivery)
            args += [
                1, key, delivery.group, delivery.consumer, entry, delivery.deliveries,
                delivery.message_id or "", int(delivery.message_id is not None), int(done),
                max(1, round(self.options.dedupe_ttl * 1000)), dead_letter or "", int(dead_letter is not None),
                delivery.topic, delivery.body if dead_letter is not None else b"",
            ]
        args.append(len(state))
        for write in state:
            args += [write.key, int(write.value is not None), write.value or b"", write.expected_version]
        args += self._message_args(publish)
        return _STATUS[await self._run("COMMIT", args)]

    def _locate(self, delivery: Delivery) -> tuple[str, str]:
        """The stream key and entry id behind a delivery."""
        if delivery.entry_id.startswith(_PRIVATE):
            key = f"{self._prefix}:_group:{delivery.group}:{delivery.topic}"
            return key, delivery.entry_id[len(_PRIVATE):]
        return f"{self._prefix}:{delivery.topic}", delivery.entry_id

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
    ) -> list[Delivery]:
        """Hand out up to ``limit`` deliveries (see ``Broker.fetch``).

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
                found, tails = await self._fetch_once(consumer, streams, limit)
                self._outage.ended()
                if found:
                    return found
                now = time.monotonic()
                if now >= deadline:
                    return []
                if tails is None:
                    continue  # read only duplicates or dead letters, or regrouped: read on
                slots = [self._claim_due[_slot(s)] for s in streams]
                wait = min(deadline, self._delayed_due, *slots) - now
                if wait > 0:
                    assert self._reader is not None
                    await wait_for_entries(self._reader, tails, wait)
            except Exception as exc:
                if self._client is None:
                    return []  # closed while waiting
                if not _is_transient(exc):
                    if isinstance(exc, rexc.RedisError):
                        raise BrokerError(f"fetch failed on {self.url}: {type(exc).__name__}: {exc}") from exc
                    raise
                await self._outage.pause(exc, deadline - time.monotonic())
                return []

    async def _fetch_once(
        self, consumer: str, streams: list[_Stream], limit: int
    ) -> tuple[list[Delivery], dict[str, str] | None]:
        now = time.monotonic()
        move_delayed = now >= self._delayed_due
        args: list[Any] = [
            self._prefix, consumer, limit, self.max_deliveries, int(move_delayed),
            round(self.visibility_timeout * 1000), "",
        ]
        for s in streams:
            slot = _slot(s)
            claim = now >= self._claim_due.setdefault(slot, now)
            if claim:
                self._claim_due[slot] = now + self.options.effective_claim_interval
            args += [s.key, s.topic, s.group, int(claim), self._cursors.get(slot, "0-0")]
        if self.options.maxlen is not None and now >= self._trim_due:
            self._trim_due = now + _TRIM_INTERVAL
            await self.trim()
        out, read_any, missing, cursors, tails, next_due = await self._scripts["FETCH"](args=args)
        for s, cursor in zip(streams, cursors, strict=True):
            self._cursors[_slot(s)] = _text(cursor)
        if move_delayed:
            soon = _DELAYED_POLL if next_due < 0 else min(_DELAYED_POLL, next_due / 1000)
            self._delayed_due = time.monotonic() + soon
        if missing:
            await self._recover_groups([streams[i - 1] for i in missing])
        found = []
        for index, entry, message_id, body, count in out:
            s = streams[index - 1]
            entry_id = _text(entry)
            found.append(
                Delivery(
                    topic=s.topic, group=s.group, consumer=consumer,
                    entry_id=_PRIVATE + entry_id if s.private else entry_id,
                    message_id=_text(message_id), body=bytes(body), deliveries=int(count),
                )
            )
        if found or read_any or missing:
            return found, None
        return [], {s.key: _text(tail) for s, tail in zip(streams, tails, strict=True)}

    async def _recover_groups(self, streams: Sequence[_Stream]) -> None:
        self.group_recoveries += 1
        self._outage.note_nogroup(", ".join(sorted({f"{s.key} ({s.group})" for s in streams})))
        await self._create_groups(streams)

    # -- retention -----------------------------------------------------------

    async def trim(self) -> int:
        """Trim the streams this broker has used to about ``maxlen`` entries.

        Never trims an entry that any group still has pending or has not been
        delivered yet. Runs from ``fetch`` every few seconds; returns how many
        entries were removed (0 without ``maxlen``).
        """
        if self.options.maxlen is None or not self._known:
            return 0
        args: list[Any] = [self.options.maxlen]
        for s in self._known.values():
            args += [s.key, int(s.private)]
        return int(await self._run("TRIM", args))

    # -- state, backlog, dead letters ----------------------------------------

    async def get_state(self, key: str) -> Versioned | None:
        try:
            value, version = await self._redis().hmget(f"{self._prefix}:_state:{key}", ["v", "n"])
        except rexc.RedisError as exc:
            raise BrokerError(f"get_state failed on {self.url}: {exc}") from exc
        if value is None:
            return None
        return Versioned(value=bytes(value), version=int(version))

    async def list_state(self, prefix: str) -> dict[str, Versioned]:
        flat = await self._run("LIST_STATE", [self._prefix, prefix])
        return {
            _text(flat[i]): Versioned(value=bytes(flat[i + 1]), version=int(flat[i + 2]))
            for i in range(0, len(flat), 3)
        }

    async def backlog(self, subscriptions: Sequence[Subscription]) -> list[GroupBacklog]:
        args: list[Any] = [self._prefix]
        for sub in subscriptions:
            _check_name("topic", sub.topic)
            _check_name("group", sub.group)
            args += [sub.topic, sub.group]
        flat = await self._run("BACKLOG", args)
        return [
            GroupBacklog(topic=sub.topic, group=sub.group, ready=int(flat[3 * i]),
                         pending=int(flat[3 * i + 1]), delayed=int(flat[3 * i + 2]))
            for i, sub in enumerate(subscriptions)
        ]

    async def dead_letters(self, limit: int = 1000) -> list[DeadLetterRecord]:
        try:
            entries = await self._redis().xrange(f"{self._prefix}:_dead", count=max(1, limit))
        except rexc.RedisError as exc:
            raise BrokerError(f"dead_letters failed on {self.url}: {exc}") from exc
        records = []
        for entry_id, fields in entries:
            message_id = fields.get(b"message_id")
            records.append(
                DeadLetterRecord(
                    id=_text(entry_id),
                    topic=_text(fields.get(b"topic", b"")),
                    group=_text(fields.get(b"group", b"")),
                    message_id=None if message_id is None else _text(message_id),
                    body=bytes(fields.get(b"body", b"")),
                    reason=_text(fields.get(b"reason", b"")),
                    deliveries=int(fields.get(b"deliveries", 0)),
                    dead_at=float(fields.get(b"dead_at", 0)),
                )
            )
        return records

    async def replay(self, dead_letter_id: str) -> bool:
        if not _is_stream_id(dead_letter_id):
            return False
        return bool(await self._run("REPLAY", [self._prefix, dead_letter_id]))

    async def purge_dead_letters(self, ids: Sequence[str] | None = None) -> int:
        key = f"{self._prefix}:_dead"
        try:
            if ids is None:
                pipe = self._redis().pipeline(transaction=True)
                pipe.xlen(key)
                pipe.delete(key)
                count, _ = await pipe.execute()
                return int(count)
            valid = [i for i in ids if _is_stream_id(i)]
            return int(await self._redis().xdel(key, *valid)) if valid else 0
        except rexc.RedisError as exc:
            raise BrokerError(f"purge_dead_letters failed on {self.url}: {exc}") from exc


def _slot(stream: _Stream) -> str:
    return f"{stream.key}\n{stream.group}"


def _is_stream_id(value: str) -> bool:
    ms, dash, seq = value.partition("-")
    return bool(dash) and ms.isdigit() and seq.isdigit()
