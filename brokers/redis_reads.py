"""Plain reads for the Redis Streams adapter on a single server: XREADGROUP
sent by the client, not run inside the FETCH script.

A script that reads hands Redis every entry twice more: its reply turned into
Lua values, then the script's own reply built from them. Measured under
``valgrind --tool=callgrind``, that conversion was the largest part of
Redis's work per event. So while no timer is due and each stream's tail is
known, ``fetch`` reads with one XREADGROUP per group over all of that group's
streams (on one write), and asks the small MARK script which message ids its
groups already settled (ids only, no bodies). Entries that must not be handed
out (a field missing, a body over the consumer's size limit) are
dead-lettered by the BURY script, which fences on the lease like a commit and
copies the entry from the stream itself.

When it waits (every stream read to its end), the reads go behind a blocking
XREAD instead, in the READ script (``brokers.redis_scripts``), which marks
duplicates and dead-letters on the spot: a delivery that trickles in is then
handed out in one round trip, not two. Only there: what wakes a wait is
usually an entry or a few, while a read under load takes up to ``limit`` per
stream, where the script's conversions would cost Redis more than
XREADGROUP and MARK.

Each XREADGROUP asks for ``limit`` entries per stream (COUNT bounds each
stream, not the command): a share per group made the reads small when a
busy worker asks for a few at a time (measured: three times the commit
batches per chain, and more worker CPU). What is read over ``limit`` waits
in a per-consumer spill and goes out first on the next ``fetch``, with no
read; its lease is held meanwhile. Spilled entries older than a third of
``visibility_timeout`` are not handed out (another consumer may reclaim
them soon; they are left to that reclaim, as after a crash), and a consumer
that stops fetching leaves its spill to be reclaimed the same way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from redis import exceptions as rexc

from brokers import redis_admin
from brokers.base import DEAD_LETTER_KEPT, BrokerError, Delivery, log_dead_letter, new_delivery
from brokers.redis_lines import Line, run_script
from brokers.redis_scripts import SETTLED
from brokers.redis_support import PRIVATE_TAG, Stream, slot

__all__ = ("BURY", "MARK", "PlainReads", "stream_order")

log = logging.getLogger("brokers.redis")

#: Seconds a MARK call may take before its connection is taken for dead
#: (above the Redis freezes the fault tests make, far below a hang).
_MARK_TIMEOUT = 30.0

# ARGV: per group: the group, the number of ids, the ids. Returns 1 (settled
# in the group already) or 0 per id, in order.
MARK = SETTLED + r"""
local out = {}
local at = 1
while at <= #ARGV do
  local n = tonumber(ARGV[at + 1])
  for _, flag in ipairs(settled(ARGV[at], ARGV, at + 2, n)) do out[#out + 1] = flag end
  at = at + 2 + n
end
return out
"""

# ARGV: consumer, bytes kept of an oversized entry, then per entry: stream key,
# topic, group, entry id, reason. Dead-letters each entry this consumer still
# holds on its first delivery (the fence of a commit), copying it from the
# stream, and acks it. Returns how many it buried.
BURY = r"""
local consumer, keep = ARGV[1], tonumber(ARGV[2])
local now = now_ms()
local buried = 0
for i = 3, #ARGV, 5 do
  local skey, topic, group, eid, reason = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  if owns(skey, group, consumer, eid, 1) then
    local mid, body = false, ''
    local rows = redis.call('XRANGE', skey, eid, eid)
    if #rows > 0 then
      local flat = rows[1][2]
      for j = 1, #flat, 2 do
        if flat[j] == 'id' then mid = flat[j + 1] elseif flat[j] == 'body' then body = flat[j + 1] end
      end
    end
    dead_letter(topic, group, mid, body, reason, 1, now, keep)
    redis.call('XACK', skey, group, eid)
    buried = buried + 1
  end
end
return buried
"""


def stream_order(entry_id: str) -> tuple[int, int]:
    """A stream entry id (``ms-seq``) as numbers, for comparing two ids."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class PlainReads(redis_admin.RedisAdmin):
    """The plain-read half of ``RedisFetch`` (see the module doc)."""

    url: str
    _client: Any | None
    _scripts: dict[str, Any]
    #: Per (stream, group): the last entry id known delivered in the group.
    _tails: dict[str, str]
    visibility_timeout: float
    #: Per consumer: deliveries read past a fetch's limit, handed out next,
    #: each with when it was read (``time.monotonic``).
    _spill: dict[str, list[tuple[float, Delivery]]]

    def _spilled(self, consumer: str, streams: Sequence[Stream], limit: int) -> list[Delivery]:
        """Up to ``limit`` spilled deliveries of ``consumer`` for ``streams``' groups."""
        waiting = self._spill.get(consumer)
        if not waiting:
            return []
        fresh = time.monotonic() - self.visibility_timeout / 3
        wanted = {(s.topic, s.group) for s in streams}
        out: list[Delivery] = []
        kept: list[tuple[float, Delivery]] = []
        for read, d in waiting:
            if read < fresh:
                continue  # left to a reclaim: see the module doc
            if len(out) < limit and (d.topic, d.group) in wanted:
                out.append(d)
            else:
                kept.append((read, d))
        self._spill[consumer] = kept
        return out

    def _block_tails(self, streams: Sequence[Stream]) -> dict[str, str] | None:
        """Per stream key, where a blocking XREAD starts (the lowest tail of
        its groups), or ``None`` if some stream's tail is unknown."""
        at: dict[str, str] = {}
        for s in streams:
            tail = self._tails.get(slot(s))
            if tail is None:
                return None
            if s.key not in at or stream_order(tail) < stream_order(at[s.key]):
                at[s.key] = tail
        return at

    async def _read_plain(
        self, line: Line, consumer: str, streams: Sequence[Stream], limit: int, max_size: int | None,
        block_ms: int,
    ) -> tuple[list[Delivery], bool, bool, list[Stream]]:
        """One plain read: deliveries (at most ``limit``; the rest spilled),
        whether every stream was read to its end, whether a blocking XREAD
        woke, and the streams whose group is gone (NOGROUP). With ``block_ms``
        the reads wait behind an XREAD BLOCK from the known tails."""
        groups: dict[str, list[Stream]] = {}
        for s in streams:
            groups.setdefault(s.group, []).append(s)
        if block_ms:
            return await self._read_blocking(line, consumer, groups, limit, max_size, block_ms)
        commands = [("XREADGROUP", "GROUP", group, consumer, "COUNT", limit, "STREAMS",
                     *[s.key for s in members], *[">"] * len(members)) for group, members in groups.items()]
        # A blackholed connection never answers: it is closed after 5 s.
        async with asyncio.timeout(5.0):
            replies = await line.call(*commands)
        found: list[Delivery] = []
        asked: dict[str, list[bytes]] = {}  # message ids per group, in the order of ``found``
        bad: list[tuple[Stream, str, str]] = []
        missing: list[Stream] = []
        drained = True
        for members, reply in zip(groups.values(), replies, strict=True):
            if isinstance(reply, Exception):
                if not str(reply).startswith("NOGROUP"):
                    raise reply
                missing += members
                continue
            by_key = {s.key: s for s in members}
            for key, entries in reply or ():
                s = by_key[key.decode()]
                if len(entries) >= limit:
                    drained = False
                self._tails[slot(s)] = entries[-1][0].decode()
                topic, group, prefix = s.topic, s.group, PRIVATE_TAG if s.private else ""
                ids = asked.setdefault(group, [])
                for entry, fields in entries:
                    # The usual entry, as choreo writes it: id, then body.
                    if len(fields) == 4 and fields[0] == b"id" and fields[2] == b"body" and not (
                            max_size and len(fields[3]) > max_size):
                        mid, body = fields[1], fields[3]
                    else:
                        mid, body = _fields(fields)
                        reason = _unreadable(mid, body, max_size)
                        if reason is not None or mid is None or body is None:
                            bad.append((s, entry.decode(), reason or ""))
                            continue
                    found.append(new_delivery(topic, group, consumer, prefix + entry.decode(),
                                              mid.decode("utf-8", "replace"), body, 1))
                    ids.append(mid)
        if bad:
            await self._bury(consumer, bad)
        if found:
            found = await self._mark(line, found, asked)
        self._keep_spill(consumer, found, limit)
        return found, drained and not bad and not missing, False, missing

    async def _read_blocking(
        self, line: Line, consumer: str, groups: dict[str, list[Stream]], limit: int, max_size: int | None,
        block_ms: int,
    ) -> tuple[list[Delivery], bool, bool, list[Stream]]:
        """``_read_plain`` behind an XREAD BLOCK from the known tails: the
        reads, duplicate marks and dead letters in one READ script, which
        Redis runs the moment the XREAD returns, so that an entry that
        trickles in is handed out in one round trip. (Not for reads under
        load: a script costs Redis more per entry than XREADGROUP and MARK.)"""
        order = [s for members in groups.values() for s in members]
        tails = self._block_tails(order)
        assert tails is not None
        script = self._scripts["READ"]
        args: list[Any] = [consumer, limit, max_size or 0, DEAD_LETTER_KEPT]
        for group, members in groups.items():
            args += [group, len(members)]
            for s in members:
                args += [s.key, s.topic]
        # BLOCK is enforced by Redis; the outer timeout catches a dead connection
        # (a blackholed one never answers; the connection is then closed).
        async with asyncio.timeout(block_ms / 1000 + 5.0):
            waited, reply = await line.call(("XREAD", "COUNT", 1, "BLOCK", block_ms, "STREAMS", *tails,
                                             *tails.values()), ("EVALSHA", script.sha, 0, *args))
        woke = waited is not None and not isinstance(waited, Exception)
        if isinstance(reply, rexc.NoScriptError):
            # An emptied script cache: read again without blocking, with the script loaded.
            await self._redis().script_load(script.script)
            return [], False, woke, []
        if isinstance(reply, Exception):
            raise reply
        out, last, full, buried, gone = reply
        for index, entry in enumerate(last):
            if entry:
                self._tails[slot(order[index])] = entry.decode()
        for index, entry, reason in buried:
            s = order[index - 1]
            log_dead_letter(log, s.topic, s.group, (PRIVATE_TAG if s.private else "") + entry.decode(), reason.decode())
        found: list[Delivery] = []
        for index, entry, mid, body, duplicate in out:
            s = order[index - 1]
            found.append(new_delivery(s.topic, s.group, consumer, (PRIVATE_TAG if s.private else "") + entry.decode(),
                                      mid.decode("utf-8", "replace"), body, 1, duplicate == 1))
        self._keep_spill(consumer, found, limit)
        missing = [order[index - 1] for index in gone]
        return found, not full and not buried and not missing, woke, missing

    def _keep_spill(self, consumer: str, found: list[Delivery], limit: int) -> None:
        """Move what ``found`` holds past ``limit`` to ``consumer``'s spill."""
        if len(found) > limit:
            now = time.monotonic()
            self._spill.setdefault(consumer, []).extend((now, d) for d in found[limit:])
            del found[limit:]

    async def _mark(self, line: Line, found: list[Delivery], asked: dict[str, list[bytes]]) -> list[Delivery]:
        """``found`` with each delivery whose message id was already settled in
        its group marked as a duplicate (MARK; ``asked`` holds the ids of each
        group, whose deliveries follow one another in ``found``)."""
        args: list[Any] = []
        for group, ids in asked.items():
            if ids:
                args += [group, len(ids), *ids]
        script = self._scripts["MARK"]

        async def load() -> None:
            await self._redis().script_load(script.script)

        # Bounded like the blocking read: a blackholed connection never answers.
        async with asyncio.timeout(_MARK_TIMEOUT):
            reply = await run_script(line, script.sha, args, load)
        if 1 in reply:
            found = [d if flag != 1 else new_delivery(d.topic, d.group, d.consumer, d.entry_id, d.message_id, d.body,
                                                      d.deliveries, True)
                     for d, flag in zip(found, reply, strict=True)]
        return found

    async def _bury(self, consumer: str, bad: list[tuple[Stream, str, str]]) -> None:
        """Dead-letter entries no consumer may be handed (see BURY), and log them."""
        args: list[Any] = [consumer, DEAD_LETTER_KEPT]
        for s, eid, reason in bad:
            args += [s.key, s.topic, s.group, eid, reason]
        await self._scripts["BURY"](args=args)
        for s, eid, reason in bad:
            log_dead_letter(log, s.topic, s.group, PRIVATE_TAG + eid if s.private else eid, reason)

    def _redis(self) -> Any:
        if self._client is None:
            raise BrokerError(f"broker {self.url} is not connected: await connect() first")
        return self._client


def _fields(fields: Any) -> tuple[bytes | None, bytes | None]:
    """An entry's ``id`` and ``body`` fields (a flat RESP2 list of names and values)."""
    mid = body = None
    for i in range(0, len(fields) - 1, 2):
        name = fields[i]
        if name == b"id":
            mid = fields[i + 1]
        elif name == b"body":
            body = fields[i + 1]
    return mid, body


def _unreadable(mid: bytes | None, body: bytes | None, max_size: int | None) -> str | None:
    """Why an entry read for the first time may not be handed out, if so
    (the same reasons, in the same words, as the scripts' ``unreadable``)."""
    if mid is None:
        return 'unreadable entry: missing field "id"'
    if body is None:
        return 'unreadable entry: missing field "body"'
    if max_size and len(body) > max_size:
        return f"oversized entry: {len(body)} bytes, over the {max_size}-byte limit"
    return None
