"""Plumbing for the Redis Streams adapter: connections, server checks, names,
and backoff with bounded logging while Redis is unreachable, loading or busy.
The dedicated connections of the delivery path are in ``brokers.redis_lines``."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import attrs
import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from brokers.base import BrokerError, DeadLetterRecord
from brokers.options import BrokerOptions

__all__ = (
    "PRIVATE_TAG",
    "Outage",
    "Stream",
    "check_server",
    "dead_letter_record",
    "is_stream_id",
    "is_transient",
    "open_clients",
    "redis_url",
    "slot",
    "tag_entry",
    "text",
    "untag_entry",
)

_OPTION_NAMES = frozenset(field.name for field in attrs.fields(BrokerOptions))
#: A cluster mid-failover or mid-migration: ClusterDownError, TryAgainError,
#: ClusterError ("TTL exhausted" after redirections), MasterDownError.
_TRANSIENT = (rexc.ConnectionError, rexc.TimeoutError, rexc.BusyLoadingError, OSError, rexc.ClusterError,
              rexc.ClusterDownError, rexc.TryAgainError, rexc.MasterDownError, rexc.SlotNotCoveredError)
#: Seconds between repeated log lines about the same condition.
_LOG_EVERY = 30.0
_MAX_BACKOFF = 2.0
#: Connections in the command pool, and seconds a caller waits for a free one
#: (then ``ConnectionError``, which is transient: the delivery is redelivered).
_POOL_SIZE = 32
_POOL_WAIT = 20.0


#: Marks ``Delivery.entry_id`` (and inspection ids) of a group's private stream.
PRIVATE_TAG = "p:"


@attrs.frozen
class Stream:
    """One stream a subscription reads: its topic's, or its group's private
    one, in one partition (always 0 on a single Redis server)."""

    key: str
    topic: str
    group: str
    private: bool
    partition: int = 0


def tag_entry(partitioned: bool, partition: int, entry_id: str) -> str:
    """An id choreo hands out for an entry of ``partition`` (``Delivery.entry_id``,
    inspection ids): on Redis Cluster ``<partition>:`` goes in front."""
    return f"{partition}:{entry_id}" if partitioned else entry_id


def untag_entry(partitioned: bool, entry_id: str) -> tuple[int, str]:
    """The partition and the rest of an id made by ``tag_entry``.

    Raises:
        ValueError: a partitioned id without its partition.
    """
    if not partitioned:
        return 0, entry_id
    partition, colon, rest = entry_id.partition(":")
    if not colon or not partition.isdigit():
        raise ValueError(f"entry id {entry_id!r} names no partition")
    return int(partition), rest


def slot(stream: Stream) -> str:
    """Key for per-(stream, group) bookkeeping (claim timers, claim cursors)."""
    return f"{stream.key}\n{stream.group}"


def redis_url(url: str) -> str:
    """The URL for redis-py: choreo's own query options removed."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in _OPTION_NAMES]
    return urlunsplit(parts._replace(query=urlencode(query)))


def is_transient(exc: BaseException) -> bool:
    """Whether waiting can cure ``exc`` (not a wrong password or a missing permission)."""
    if isinstance(exc, rexc.AuthenticationError | rexc.AuthorizationError):
        return False
    if isinstance(exc, _TRANSIENT):
        return True
    return isinstance(exc, rexc.ResponseError) and str(exc).startswith(("BUSY ", "MASTERDOWN", "TRYAGAIN"))


def is_stream_id(value: str) -> bool:
    ms, dash, seq = value.partition("-")
    return bool(dash) and ms.isdigit() and seq.isdigit()


def text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


async def open_clients(url: str, safe_url: str) -> tuple[Any, Any]:
    """A command client and a client for blocking reads (its own pool), pinged.

    Raises:
        BrokerError: Redis is unreachable or refuses the credentials.
    """
    common: dict[str, Any] = {"decode_responses": False, "protocol": 2, "socket_connect_timeout": 5.0}
    # A blocking pool: more concurrent callers than connections wait for one
    # (redis-py's default pool raises MaxConnectionsError instead).
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=_POOL_SIZE, timeout=_POOL_WAIT,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2), **common,
    )
    client = aioredis.Redis.from_pool(pool)  # owns the pool: aclose() closes it
    # Blocking reads have no socket timeout: each call bounds its own wait.
    reader = aioredis.from_url(url, retry=Retry(NoBackoff(), 0), socket_timeout=None, **common)
    try:
        await client.ping()
    except Exception as exc:
        await client.aclose()
        await reader.aclose()
        raise BrokerError(f"cannot connect to {safe_url}: {type(exc).__name__}: {exc}") from None
    return client, reader


async def check_server(client: Any, safe_url: str, log: logging.Logger) -> None:
    """Warn unless Redis keeps data like a database (RELIABILITY rule 7)."""
    try:
        found = {**await client.config_get("appendonly"), **await client.config_get("maxmemory-policy")}
    except rexc.ResponseError as exc:
        # A least-privilege ACL user may not run CONFIG: say so once rather
        # than let an unchecked server pass for a checked one.
        log.info(
            "Redis at %s: skipped the appendonly / maxmemory-policy check (%s); grant +config|get to keep it",
            safe_url, str(exc).split("\n")[0][:120],
        )
        return
    config = {text(k): text(v) for k, v in found.items()}
    if config.get("appendonly", "yes") != "yes":
        log.warning(
            "Redis at %s runs with appendonly no: acknowledged events are lost if it crashes "
            "(set appendonly yes)", safe_url,
        )
    policy = config.get("maxmemory-policy", "noeviction")
    if policy != "noeviction":
        log.warning(
            "Redis at %s runs with maxmemory-policy %s: eviction destroys streams and groups "
            "(set maxmemory-policy noeviction)", safe_url, policy,
        )


def dead_letter_record(entry_id: bytes | str, fields: dict[bytes, bytes]) -> DeadLetterRecord:
    message_id = fields.get(b"message_id")
    return DeadLetterRecord(
        id=text(entry_id),
        topic=text(fields.get(b"topic", b"")),
        group=text(fields.get(b"group", b"")),
        message_id=None if message_id is None else text(message_id),
        body=bytes(fields.get(b"body", b"")),
        reason=text(fields.get(b"reason", b"")),
        deliveries=int(fields.get(b"deliveries", b"0")),
        dead_at=float(fields.get(b"dead_at", b"0")),
        size=int(fields[b"size"]) if b"size" in fields else None,
        sha1=text(fields[b"sha1"]) if b"sha1" in fields else None,
    )


class Outage:
    """Backoff and log rate limiting for one broker's connection trouble."""

    def __init__(self, log: logging.Logger, url: str) -> None:
        self._log = log
        self._url = url
        self._backoff = 0.0
        self._since: float | None = None
        self._logged = 0.0
        self._nogroup_logged = -_LOG_EVERY
        self._nogroup_quiet = 0

    async def pause(self, exc: BaseException, budget: float) -> None:
        """Record a failed call and sleep a growing backoff (at most ``budget``,
        but never zero, so a caller retrying at once cannot spin)."""
        now = time.monotonic()
        if self._since is None:
            self._since = self._logged = now
            self._log.warning("Redis at %s is unavailable (%s: %s); retrying with backoff",
                              self._url, type(exc).__name__, exc)
        elif now - self._logged >= _LOG_EVERY:
            self._logged = now
            self._log.warning("Redis at %s still unavailable after %.0f s (%s)",
                              self._url, now - self._since, type(exc).__name__)
        self._backoff = min(_MAX_BACKOFF, max(0.05, self._backoff * 2))
        await asyncio.sleep(min(self._backoff, max(budget, 0.05)))

    def ended(self) -> None:
        """Record a successful call; log the recovery once."""
        if self._since is not None:
            self._log.warning("Redis at %s is available again after %.1f s", self._url, time.monotonic() - self._since)
            self._since = None
        self._backoff = 0.0

    def note_nogroup(self, what: str) -> None:
        """Log recreated consumer groups, at most once per interval."""
        now = time.monotonic()
        if now - self._nogroup_logged < _LOG_EVERY:
            self._nogroup_quiet += 1
            return
        more = f" ({self._nogroup_quiet} more since the last report)" if self._nogroup_quiet else ""
        self._nogroup_logged, self._nogroup_quiet = now, 0
        self._log.warning("consumer groups were missing (stream deleted, group destroyed or FLUSHALL?); "
                          "recreated on %s%s", what, more)
