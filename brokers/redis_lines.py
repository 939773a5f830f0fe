"""The Redis delivery path's own connections: ``Line`` (one connection, one
caller at a time, commands packed and written directly), the scripts run on
them, and ``ScriptBatcher``, which sends
the commits of many concurrent callers as one batch-script call."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from redis import exceptions as rexc

__all__ = (
    "Line", "ScriptBatcher", "bulk", "exchange", "pack_call", "pack_command", "resending", "run_script",
    "send_in_batches",
)

#: Resends of a commit batch after a connection error or socket timeout, and
#: the first backoff (doubled each time): what redis-py's retry did before.
_BATCH_RETRIES = 2
_BATCH_BACKOFF = 0.05

T = TypeVar("T")


class Line:
    """One connection with a pool's settings, outside the pool, for a caller
    that sends one thing at a time on it.

    redis-py's command path (pool acquire and release, the retry wrapper, the
    pipeline object) cost 75-170 µs per call on a 2-core machine, more than
    the round trip itself. The delivery path makes such calls every hop (the
    wait for new entries, the commit batch), so it writes its packed commands
    here directly. The connection (re)connects on first use; any failure but
    an error reply closes it, so a reply can never be read by the wrong call.
    The pool's socket timeout bounds each exchange as a whole (its write and
    all its replies): redis-py would run every write under ``wait_for``, a
    task of its own and a turn of the loop per call.
    """

    def __init__(self, pool: Any) -> None:
        self._connection = pool.make_connection()
        self._timeout: float | None = self._connection.socket_timeout
        self._connection.socket_timeout = None
        self.busy = False

    async def call(self, *commands: Sequence[Any]) -> list[Any]:
        """Send ``commands`` in one write and read their replies, in order;
        an error reply is returned as its ``ResponseError``.

        Raises:
            redis.exceptions.ConnectionError, redis.exceptions.TimeoutError:
                the connection failed (it is closed; the next call reconnects).
        """
        # Packed here (``pack_command``): redis-py's packer costs several times more per argument.
        return await self.send(b"".join(pack_command(command) for command in commands), len(commands))

    async def send(self, packed: bytes | list[bytes], replies: int) -> list[Any]:
        """Send commands already packed in RESP and read their ``replies`` replies."""
        connection = self._connection
        self.busy = True
        try:
            async with asyncio.timeout(self._timeout):
                return await exchange(connection, packed, replies)
        except TimeoutError:  # this exchange's own timeout (a caller's cancels it instead)
            await connection.disconnect(nowait=True)
            raise rexc.TimeoutError(f"no reply from Redis within {self._timeout} s") from None
        except BaseException:
            await connection.disconnect(nowait=True)
            raise
        finally:
            self.busy = False

    async def close(self) -> None:
        await self._connection.disconnect()


async def exchange(connection: Any, packed: bytes | list[bytes], replies: int) -> list[Any]:
    """Write ``packed`` on ``connection`` and read its ``replies`` replies, an
    exception in place of each error reply (read in full, so the connection
    stays in step). A caller that fails or is cancelled midway must close
    the connection: replies may be left unread on it."""
    await connection.send_packed_command(packed)
    out: list[Any] = []
    for _ in range(replies):
        try:
            out.append(await connection.read_response())
        except rexc.ResponseError as exc:
            out.append(exc)
    return out


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


def pack_command(command: Sequence[Any]) -> bytes:
    """One command in RESP, its arguments encoded as ``bulk`` encodes them
    (bytes, the usual argument of a read, a mark or a publish, without a
    call or a copy of their own)."""
    parts = [b"*%d\r\n" % len(command)]
    for arg in command:
        if type(arg) is bytes:  # bodies and headers: joined once, without a copy of their own
            parts += (b"$%d\r\n" % len(arg), arg, b"\r\n")
        else:
            parts.append(bulk(arg))
    return b"".join(parts)


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


async def send_in_batches(
    queue: list[tuple[T, asyncio.Future[Any]]], max_batch: int, send: Callable[[list[T]], Awaitable[list[Any]]]
) -> None:
    """Send the calls in ``queue``, up to ``max_batch`` at a time, until it is
    empty (callers append while a batch is on the wire). ``send`` returns one
    reply per call, an exception for a call that failed; each is set on its
    call's future. A call whose future is already done (its caller was
    cancelled) is dropped unsent; a send that fails fails its whole batch;
    cancelled, the calls still queued fail with ``ConnectionError``."""
    try:
        while queue:
            batch = [call for call in queue[:max_batch] if not call[1].done()]
            del queue[:max_batch]
            if not batch:
                continue
            try:
                replies = await send([item for item, _ in batch])
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
        for _, future in queue:
            if not future.done():
                future.set_exception(rexc.ConnectionError("closed before the call was sent"))
        queue.clear()


async def resending(send: Callable[[], Awaitable[T]]) -> T:
    """``send()``, sent again after a lost connection or a socket timeout, up
    to ``_BATCH_RETRIES`` times with a doubling backoff, as redis-py's retry
    would: a batch that did run before its reply was lost is refused commit by
    commit (its entries are acked), and a resent publish is deduped by its id.

    Raises:
        redis.exceptions.ConnectionError, redis.exceptions.TimeoutError: the
            last attempt's.
    """
    failures = 0
    while True:
        try:
            return await send()
        except (rexc.ConnectionError, rexc.TimeoutError):
            failures += 1
            if failures > _BATCH_RETRIES:
                raise
            await asyncio.sleep(_BATCH_BACKOFF * 2 ** (failures - 1))


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
        self._queue: list[tuple[tuple[tuple[int, bytes], int], asyncio.Future[Any]]] = []
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
        return self._queued(pack_call(args), 0)

    def commands(self, commands: Sequence[Sequence[Any]]) -> asyncio.Future[Any]:
        """Queue plain commands to go in the next batch's write, ahead of its
        script call; await the result for their replies (a list, in order; an
        error reply is in it as its ``ResponseError``). What needs no check on
        the server costs Redis less as commands than inside the script.

        Raises:
            redis.exceptions.DataError: an argument Redis cannot take.
            redis.exceptions.RedisError: from the future: the batch failed.
        """
        return self._queued((0, b"".join(pack_command(command) for command in commands)), len(commands))

    def _queued(self, packed: tuple[int, bytes], replies: int) -> asyncio.Future[Any]:
        # The loop is looked up once per batch, not per call: each lookup
        # makes a getpid() system call.
        loop = self._loop
        if self._sender is None:
            loop = self._loop = asyncio.get_running_loop()
            self._sender = loop.create_task(self._send_all(), name="choreo-redis-batch")
        assert loop is not None
        future: asyncio.Future[Any] = loop.create_future()
        # Packed here, in the caller's turn: RESP for the argument count and
        # the arguments (or the whole commands), ready to be joined into the batch.
        self._queue.append(((packed, replies), future))
        return future

    async def _send_all(self) -> None:
        try:
            await send_in_batches(self._queue, self._max_batch, self._send)
        finally:
            self._sender = None

    async def _send(self, batch: list[tuple[tuple[int, bytes], int]]) -> list[Any]:
        """One write: every queued plain command, then one EVALSHA for every
        script call; the replies, one per queued item, in queue order."""
        plain = b"".join(packed for (_, packed), replies in batch if replies)
        expected = sum(replies for _, replies in batch)
        calls = [packed for packed, replies in batch if not replies]
        script = b""
        if calls:
            script = b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n$1\r\n0\r\n%s" % (
                4 + sum(n for n, _ in calls), self._sha.encode(), bulk(len(calls)),
            )
            script = b"".join([script, *[resp for _, resp in calls]])
        answers: list[Any] = []

        async def attempt() -> None:
            nonlocal plain
            if plain:
                answers[:] = await self._line.send(plain + script, expected + bool(calls))
                plain = b""  # done: a resent script call must not send them again
            elif calls:
                answers[expected:] = await self._line.send(script, 1)

        await resending(attempt)
        if calls and isinstance(answers[-1], rexc.NoScriptError):
            await self._client.script_load(self._source)
            await resending(attempt)
        out: list[Any] = []
        at = 0
        scripted = answers[expected] if calls else []
        if isinstance(scripted, Exception):
            scripted = [scripted] * len(calls)
        elif not isinstance(scripted, list) or len(scripted) != len(calls):
            failed = rexc.ResponseError(f"batch script returned {scripted!r:.200} for {len(calls)} calls")
            scripted = [failed] * len(calls)
        replies_of_calls = iter(scripted)
        for _, replies in batch:
            if replies:
                out.append(answers[at:at + replies])
                at += replies
            else:
                out.append(next(replies_of_calls))
        return out

    async def close(self) -> None:
        """Stop sending and disconnect; calls still waiting fail with ``ConnectionError``."""
        if self._sender is not None:
            self._sender.cancel()
        await self._line.close()
