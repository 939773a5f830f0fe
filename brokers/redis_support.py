"""Plumbing for the Redis Streams adapter: connections, server checks, the
blocking wait for new entries, and backoff with bounded logging while Redis is
unreachable, loading or busy."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import attrs
import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from brokers.base import TOPIC_PATTERN, BrokerError, DeadLetterRecord
from brokers.options import BrokerOptions

__all__ = (
    "Line",
    "Outage",
    "ScriptBatcher",
    "Stream",
    "bulk",
    "check_name",
    "check_server",
    "dead_letter_record",
    "is_stream_id",
    "is_transient",
    "open_clients",
    "pack_call",
    "redis_url",
    "run_script",
    "slot",
    "text",
    "wait_then_fetch",
)

_OPTION_NAMES = frozenset(field.name for field in attrs.fields(BrokerOptions))
_TRANSIENT = (rexc.ConnectionError, rexc.TimeoutError, rexc.BusyLoadingError, OSError)
#: Seconds between repeated log lines about the same condition.
_LOG_EVERY = 30.0
_MAX_BACKOFF = 2.0
#: Connections in the command pool, and seconds a caller waits for a free one
#: (then ``ConnectionError``, which is transient: the delivery is redelivered).
_POOL_SIZE = 32
_POOL_WAIT = 20.0
#: Resends of a commit batch after a connection error or socket timeout, and
#: the first backoff (doubled each time): what redis-py's retry did before.
_BATCH_RETRIES = 2
_BATCH_BACKOFF = 0.05


@attrs.frozen
class Stream:
    """One stream a subscription reads: its topic's, or its group's private one."""

    key: str
    topic: str
    group: str
    private: bool


def slot(stream: Stream) -> str:
    """Key for per-(stream, group) bookkeeping (claim timers, claim cursors)."""
    return f"{stream.key}\n{stream.group}"


def redis_url(url: str) -> str:
    """The URL for redis-py: choreo's own query options removed."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in _OPTION_NAMES]
    return urlunsplit(parts._replace(query=urlencode(query)))


def check_name(kind: str, name: str) -> None:
    if not isinstance(name, str):
        raise BrokerError(f"invalid {kind} name {name!r}: it must be a string")
    if name in _valid_names:  # checked for every message and fetch: the regex runs once a name
        return
    if not TOPIC_PATTERN.fullmatch(name):
        raise BrokerError(f"invalid {kind} name {name!r}: letters, digits and ._-: only (at most 200)")
    if len(_valid_names) < _MAX_REMEMBERED_NAMES:
        _valid_names.add(name)


_valid_names: set[str] = set()
_MAX_REMEMBERED_NAMES = 10_000


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
    except rexc.ResponseError:
        return  # CONFIG is denied to a least-privilege ACL user: nothing to check
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


def dead_letter_record(entry_id: bytes, fields: dict[bytes, bytes]) -> DeadLetterRecord:
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
    )


class Line:
    """One connection with a pool's settings, outside the pool, for a caller
    that sends one thing at a time on it.

    redis-py's command path (pool acquire and release, the retry wrapper, the
    pipeline object) cost 75-170 µs per call on a 2-core machine, more than
    the round trip itself. The delivery path makes such calls every hop (the
    wait for new entries, the commit batch), so it writes its packed commands
    here directly. The connection (re)connects on first use; any failure but
    an error reply closes it, so a reply can never be read by the wrong call.
    """

    def __init__(self, pool: Any) -> None:
        self._connection = pool.make_connection()
        self.busy = False

    async def call(self, *commands: Sequence[Any]) -> list[Any]:
        """Send ``commands`` in one write and read their replies, in order;
        an error reply is returned as its ``ResponseError``.

        Raises:
            redis.exceptions.ConnectionError, redis.exceptions.TimeoutError:
                the connection failed (it is closed; the next call reconnects).
        """
        return await self.send(self._connection.pack_commands(commands), len(commands))

    async def send(self, packed: bytes | list[bytes], replies: int) -> list[Any]:
        """Send commands already packed in RESP and read their ``replies`` replies."""
        connection = self._connection
        self.busy = True
        try:
            await connection.send_packed_command(packed)
            out: list[Any] = []
            for _ in range(replies):
                try:
                    out.append(await connection.read_response())
                except rexc.ResponseError as exc:  # read in full: the connection is still in step
                    out.append(exc)
            return out
        except BaseException:
            await connection.disconnect(nowait=True)
            raise
        finally:
            self.busy = False

    async def close(self) -> None:
        await self._connection.disconnect()


async def run_script(line: Line, sha: str, args: Sequence[Any], load: Callable[[], Awaitable[Any]]) -> Any:
    """EVALSHA ``sha`` (no keys) with ``args`` on ``line`` and return the reply;
    on NOSCRIPT (an emptied script cache) ``load`` the script and send again.

    Raises:
        redis.exceptions.RedisError: an error reply, or the connection failed.
    """
    for attempt in range(2):
        (reply,) = await line.call(("EVALSHA", sha, 0, *args))
        if isinstance(reply, rexc.NoScriptError) and attempt == 0:
            await load()
            continue
        if isinstance(reply, Exception):
            raise reply
        return reply
    raise AssertionError("unreachable")  # pragma: no cover


async def wait_then_fetch(line: Line, tails: dict[str, str], seconds: float, sha: str, args: list[Any]) -> Any:
    """Block until any stream gets an entry past its tail, or ``seconds`` pass,
    then run the FETCH script (``sha``) with ``args``; return its reply.

    Both go in one write on ``line``: Redis runs the EVALSHA queued behind the
    XREAD as soon as the XREAD returns, so the read through the consumer
    groups costs no round trip of its own. The XREAD reply only wakes it.
    Returns ``None`` without waiting if ``seconds`` is under a millisecond,
    and ``None`` if the script is not loaded (NOSCRIPT: the caller's next
    ordinary FETCH loads it).
    """
    block = int(seconds * 1000)
    if block < 1 or not tails:
        return None
    xread = ("XREAD", "COUNT", 1, "BLOCK", block, "STREAMS", *tails, *tails.values())
    # BLOCK is enforced by Redis; the outer timeout catches a dead connection.
    async with asyncio.timeout(seconds + 5.0):
        _, reply = await line.call(xread, ("EVALSHA", sha, 0, *args))
    if isinstance(reply, rexc.NoScriptError):
        return None
    if isinstance(reply, Exception):
        raise reply
    return reply


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


def bulk(value: bytes | str | int | float) -> bytes:
    """One RESP bulk string, encoded as redis-py encodes arguments."""
    if isinstance(value, bytes):
        data = value
    elif isinstance(value, str):
        data = value.encode()
    elif isinstance(value, bool):
        raise rexc.DataError(f"invalid argument {value!r}: convert a bool to bytes, a string or a number first")
    elif isinstance(value, int | float):
        data = repr(value).encode()
    elif isinstance(value, bytearray | memoryview):
        data = bytes(value)
    else:
        raise rexc.DataError(f"invalid argument of type {type(value).__name__}")
    return b"$%d\r\n%s\r\n" % (len(data), data)


_SMALL_COUNTS = tuple(bulk(n) for n in range(64))


def pack_call(args: Sequence[Any]) -> tuple[int, bytes]:
    """One call of a batch script in RESP: its argument count, then its
    arguments; and how many bulk strings that makes. Packing a commit here
    costs a fraction of redis-py's general command packer."""
    count = len(args)
    parts = [_SMALL_COUNTS[count] if count < len(_SMALL_COUNTS) else bulk(count)]
    for arg in args:
        if type(arg) is bytes:  # the usual case: header and bodies, joined once without a copy of their own
            parts += (b"$%d\r\n" % len(arg), arg, b"\r\n")
        else:
            parts.append(bulk(arg))
    return len(args) + 1, b"".join(parts)


class ScriptBatcher:
    """Runs a batch script for many concurrent callers, one round trip a batch.

    The script takes the number of calls, then each call's argument count and
    arguments, and returns one reply per call; each call is atomic and fenced
    on its own inside it (see ``COMMIT_BATCH``). Calls made while a batch is on
    the wire go together in the next one. A call whose caller was cancelled
    before it was sent is dropped, so nothing runs on behalf of a caller that
    is gone. NOSCRIPT (an empty script cache after a Redis restart) means none
    of the batch ran: the script is loaded once and the batch resent.
    """

    def __init__(self, client: Any, source: str, *, max_batch: int = 500) -> None:
        self._client = client
        self._source = source
        self._sha = hashlib.sha1(source.encode()).hexdigest()
        self._max_batch = max_batch
        self._line = Line(client.connection_pool)
        self._queue: list[tuple[tuple[int, bytes], asyncio.Future[Any]]] = []
        self._sender: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def call(self, args: Sequence[Any]) -> asyncio.Future[Any]:
        """Queue a run of the script with ``args`` as ARGV (no keys); await the
        result for its reply. (A plain function returning the future: one
        coroutine less per commit.)

        Raises:
            redis.exceptions.DataError: an argument Redis cannot take.
            redis.exceptions.RedisError: from the future: the call (or its
                whole batch) failed.
        """
        # The loop is looked up once per batch, not per call: each lookup
        # makes a getpid() system call.
        loop = self._loop
        if self._sender is None:
            loop = self._loop = asyncio.get_running_loop()
            self._sender = loop.create_task(self._send_all(), name="choreo-redis-batch")
        assert loop is not None
        future: asyncio.Future[Any] = loop.create_future()
        # Packed here, in the caller's turn: RESP for the argument count and
        # the arguments, ready to be joined into the batch's EVALSHA.
        self._queue.append((pack_call(args), future))
        return future

    async def _send_all(self) -> None:
        try:
            while self._queue:
                batch = [call for call in self._queue[: self._max_batch] if not call[1].done()]
                del self._queue[: self._max_batch]
                if not batch:
                    continue
                try:
                    replies = await self._send([packed for packed, _ in batch])
                except BaseException as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc if isinstance(exc, Exception) else rexc.ConnectionError(
                                "the batch was cancelled before its reply arrived"))
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for (_, future), reply in zip(batch, replies, strict=True):
                    if not future.done():
                        if isinstance(reply, Exception):
                            future.set_exception(reply)
                        else:
                            future.set_result(reply)
        finally:
            self._sender = None
            if self._queue:  # cancelled with calls still waiting
                for _, future in self._queue:
                    if not future.done():
                        future.set_exception(rexc.ConnectionError("closed before the call was sent"))
                self._queue.clear()

    async def _send(self, batch: list[tuple[int, bytes]]) -> list[Any]:
        head = b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n$1\r\n0\r\n%s" % (
            4 + sum(n for n, _ in batch), self._sha.encode(), bulk(len(batch)),
        )
        packed = b"".join([head, *[resp for _, resp in batch]])
        failures, loaded = 0, False
        while True:
            try:
                (replies,) = await self._line.send(packed, 1)
            except (rexc.ConnectionError, rexc.TimeoutError):
                # Resent as redis-py's retry would: a batch that did run before
                # its reply was lost is refused commit by commit (the entries
                # are acked), and a resent publish is deduped by its id.
                failures += 1
                if failures > _BATCH_RETRIES:
                    raise
                await asyncio.sleep(_BATCH_BACKOFF * 2 ** (failures - 1))
                continue
            if isinstance(replies, rexc.NoScriptError) and not loaded:
                await self._client.script_load(self._source)
                loaded = True
                continue
            if isinstance(replies, Exception):
                raise replies
            if not isinstance(replies, list) or len(replies) != len(batch):
                raise rexc.ResponseError(f"batch script returned {replies!r:.200} for {len(batch)} calls")
            return replies

    async def close(self) -> None:
        """Stop sending and disconnect; calls still waiting fail with ``ConnectionError``."""
        if self._sender is not None:
            self._sender.cancel()
        await self._line.close()
