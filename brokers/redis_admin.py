"""The operations side of the Redis Streams adapter: retention (its script and
bounds are in ``brokers.redis_retention``), state reads,
and the ``Inspection`` role (history, cursors, leases, delayed messages,
backlog, dead letters), mixed into ``RedisStreamsBroker``, with the Lua
scripts they run. These calls are rare next to fetch and commit, so they
favour plain commands over batching; the inspection reads may SCAN. On
Redis Cluster each reads every partition, and the ids it hands out carry
their partition (``tag_entry``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Protocol

from redis import exceptions as rexc

from brokers.base import (
    BrokerError,
    DelayedMessage,
    Delivery,
    GroupBacklog,
    GroupCursor,
    HistoryEntry,
    PendingEntry,
    Subscription,
    Versioned,
    check_name,
)
from brokers.options import BrokerOptions
from brokers.redis_keys import Keys
from brokers.redis_retention import retention_bounds
from brokers.redis_scripts import COMMON
from brokers.redis_support import (
    PRIVATE_TAG,
    Stream,
    is_transient,
    tag_entry,
    text,
    untag_entry,
)

__all__ = ("BACKLOG", "LIST_STATE", "RedisAdmin")

#: Entries read per XRANGE call while scanning history.
_PAGE = 1000

class _Host(Protocol):
    """What the mixin needs from the broker it is part of."""

    url: str
    options: BrokerOptions
    keys: Keys
    clustered: bool
    _known: dict[str, Stream]

    def _redis(self) -> Any: ...

    async def _run(self, script: str, args: Sequence[Any], partition: int = 0) -> Any: ...


class RedisAdmin:
    """Retention, state reads and inspection of ``RedisStreamsBroker``."""

    # -- retention -----------------------------------------------------------

    async def trim(self: _Host) -> int:
        """Apply retention to the streams this broker has used: remove the
        entries past the newest ``maxlen`` and those older than ``retention``.

        Never trims an entry that any group still has pending or has not been
        delivered yet. Runs from ``fetch`` every few seconds; returns how many
        entries were removed (0 with retention off).
        """
        maxlen, retention = retention_bounds(self.options, self.keys.count)
        if not (maxlen or retention) or not self._known:
            return 0
        by_partition: dict[int, list[Any]] = {}
        for s in self._known.values():
            by_partition.setdefault(s.partition, [maxlen, retention]).extend((s.key, int(s.private)))
        removed = 0
        for p, args in by_partition.items():
            try:
                removed += int(await self._run("TRIM", args, p))
            except BrokerError as exc:
                # A master failing over or out of reach: its partitions are trimmed by a later sweep.
                if not (self.clustered and exc.__cause__ is not None and is_transient(exc.__cause__)):
                    raise
        return removed

    # -- state ---------------------------------------------------------------

    async def get_state(self: _Host, key: str, *, near: Delivery | None = None) -> Versioned | None:
        """Read one state key (see ``State.get_state``): on Redis Cluster in
        the partition of ``near``, else the highest version of every partition's."""
        if near is not None and self.clustered:
            partitions = [untag_entry(True, near.entry_id)[0]]
        else:
            partitions = list(range(self.keys.count))
        try:
            pipe = self._redis().pipeline(transaction=False)
            for p in partitions:
                pipe.hmget(self.keys.state(key, p), ["v", "n"])
            found = [Versioned(value=bytes(value), version=int(version))
                     for value, version in await pipe.execute() if value is not None]
        except rexc.RedisError as exc:
            raise BrokerError(f"get_state failed on {self.url}: {exc}") from exc
        return max(found, key=lambda v: v.version, default=None)

    async def list_state(self: _Host, prefix: str) -> dict[str, Versioned]:
        """Read every state key that starts with ``prefix`` (one script per partition)."""
        out: dict[str, Versioned] = {}
        for p in range(self.keys.count):
            flat = await self._run("LIST_STATE", [prefix], p)
            for i in range(0, len(flat), 3):
                key, found = text(flat[i]), Versioned(value=bytes(flat[i + 1]), version=int(flat[i + 2]))
                if key not in out or out[key].version < found.version:
                    out[key] = found
        return dict(sorted(out.items()))

    # -- inspection ------------------------------------------------------------

    async def history(
        self: _Host, *, message_id: str | None = None, containing: bytes | None = None, since: float | None = None
    ) -> list[HistoryEntry]:
        """The entries of every stream under the prefix (see ``Inspection.history``);
        ``since`` starts each XRANGE at that time's stream id."""
        start = "-" if since is None else f"{max(0, round(since * 1000))}-0"
        client = self._redis()
        found: list[HistoryEntry] = []
        try:
            for key, topic, group, partition in await _streams(self):
                cursor = start
                while True:
                    page = await client.xrange(key, min=cursor, max="+", count=_PAGE)
                    for entry_id, fields in page:
                        body, mid = fields.get(b"body"), fields.get(b"id")
                        if body is None or (containing is not None and containing not in body):
                            continue
                        mid_text = None if mid is None else text(mid)
                        if message_id is not None and mid_text != message_id:
                            continue
                        eid = text(entry_id) if group is None else PRIVATE_TAG + text(entry_id)
                        found.append(HistoryEntry(topic, group, tag_entry(self.clustered, partition, eid),
                                                  mid_text, bytes(body)))
                    if len(page) < _PAGE:
                        break
                    cursor = "(" + text(page[-1][0])
        except rexc.RedisError as exc:
            raise BrokerError(f"history failed on {self.url}: {exc}") from exc
        return found

    async def cursors(self: _Host) -> list[GroupCursor]:
        """Each group's last-delivered id on every stream under the prefix."""
        client = self._redis()
        found: list[GroupCursor] = []
        try:
            for key, topic, group, partition in await _streams(self):
                for info in await client.xinfo_groups(key):
                    name = text(info["name"])
                    if group is not None and name != group:
                        continue  # only the group itself reads its private stream
                    last = text(info.get("last-delivered-id") or b"0-0")
                    last = tag_entry(self.clustered, partition, last if group is None else PRIVATE_TAG + last)
                    found.append(GroupCursor(topic, name, group is not None, last))
        except rexc.RedisError as exc:
            raise BrokerError(f"cursors failed on {self.url}: {exc}") from exc
        return found

    async def pending(self: _Host, subscriptions: Sequence[Subscription], limit: int = 1000) -> list[PendingEntry]:
        """XPENDING of each subscription's two streams (the topic's first)."""
        client = self._redis()
        found: list[PendingEntry] = []
        for sub in subscriptions:
            check_name("topic", sub.topic)
            check_name("group", sub.group)
            leases: list[PendingEntry] = []
            queues = [(self.keys.stream(sub.topic, p), tag_entry(self.clustered, p, ""))
                      for p in range(self.keys.count)]
            queues += [(self.keys.private_stream(sub.group, sub.topic, p), tag_entry(self.clustered, p, PRIVATE_TAG))
                       for p in range(self.keys.count)]
            # One round trip for the subscription's streams in every partition.
            pipe = client.pipeline(transaction=False)
            for key, _ in queues:
                pipe.xpending_range(key, sub.group, min="-", max="+", count=max(1, limit))
            try:
                replies = await pipe.execute(raise_on_error=False)
            except rexc.RedisError as exc:
                raise BrokerError(f"pending failed on {self.url}: {exc}") from exc
            for (_, tag), rows in zip(queues, replies, strict=True):
                if isinstance(rows, rexc.ResponseError) and "NOGROUP" in str(rows):
                    continue  # never subscribed: nothing is pending
                if isinstance(rows, Exception):
                    raise BrokerError(f"pending failed on {self.url}: {rows}")
                leases += [PendingEntry(sub.topic, sub.group, tag + text(row["message_id"]), text(row["consumer"]),
                                        int(row["times_delivered"])) for row in rows]
            found += leases[: max(0, limit)]
        return found

    async def delayed(self: _Host, limit: int = 1000) -> list[DelayedMessage]:
        """The delayed set's soonest members, due times against the server's clock."""
        try:
            (seconds, micros) = await self._redis().time()
            pipe = self._redis().pipeline(transaction=False)
            for p in range(self.keys.count):
                pipe.zrange(self.keys.delayed(p), 0, max(0, limit) - 1, withscores=True)
            members = sorted((m for each in await pipe.execute() for m in each), key=lambda m: m[1])[: max(0, limit)]
        except rexc.RedisError as exc:
            raise BrokerError(f"delayed failed on {self.url}: {exc}") from exc
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        found = []
        for member, score in members:
            header, _, body = bytes(member).partition(b"\n")
            try:
                topic, group, message_id = json.loads(header)
            except ValueError:
                continue  # unreadable: the next fetch that moves it dead-letters it
            found.append(DelayedMessage(topic, group or None, message_id, body, max(0.0, (score - now_ms) / 1000)))
        return found

    async def backlog(self: _Host, subscriptions: Sequence[Subscription]) -> list[GroupBacklog]:
        """Ready, pending and delayed counts per subscription (one script)."""
        args: list[Any] = []
        for sub in subscriptions:
            check_name("topic", sub.topic)
            check_name("group", sub.group)
            args += [sub.topic, sub.group]
        counts = [0] * (3 * len(subscriptions))
        for p in range(self.keys.count):
            for i, n in enumerate(await self._run("BACKLOG", args, p)):
                counts[i] += int(n)
        return [
            GroupBacklog(topic=sub.topic, group=sub.group, ready=counts[3 * i],
                         pending=counts[3 * i + 1], delayed=counts[3 * i + 2])
            for i, sub in enumerate(subscriptions)
        ]


async def _streams(host: _Host) -> list[tuple[str, str, str | None, int]]:
    """Every topic's and group's stream under the prefix: (key, topic, group
    or ``None``, partition), sorted by key."""
    found = set()
    async for raw in host._redis().scan_iter(match=host.keys.pattern(), count=1000, _type="stream"):
        key = text(raw)
        parsed = host.keys.locate_stream(key)
        if parsed is not None:
            found.add((key, *parsed))
    return sorted(found)


# ARGV: per subscription: topic, group.
# Returns {ready, pending, delayed} per subscription, flattened.
BACKLOG = COMMON + r"""

local function group_info(key, group)
  local groups = redis.pcall('XINFO', 'GROUPS', key)
  if type(groups) ~= 'table' or groups.err then return nil end
  for _, flat in ipairs(groups) do
    local g = {}
    for i = 1, #flat, 2 do g[flat[i]] = flat[i + 1] end
    if g.name == group then return g end
  end
  return nil
end

local function work(key, group)
  local g = group_info(key, group)
  if g == nil then return 0, 0 end
  local ready = g.lag
  -- lag is NULL after some deletions and trims: count past the group's position
  if type(ready) ~= 'number' then
    ready = #redis.call('XRANGE', key, '(' .. g['last-delivered-id'], '+')
  end
  return ready, tonumber(g.pending)
end

local delayed = {}
for _, member in ipairs(redis.call('ZRANGE', delayed_key(), 0, -1)) do
  local cut = string.find(member, '\n', 1, true)
  if cut then
    local ok, head = pcall(cjson.decode, string.sub(member, 1, cut - 1))
    if ok and type(head) == 'table' then delayed[#delayed + 1] = head end
  end
end

local out = {}
for i = 1, #ARGV, 2 do
  local topic, group = ARGV[i], ARGV[i + 1]
  local r1, p1 = work(stream_key(topic, ''), group)
  local r2, p2 = work(stream_key(topic, group), group)
  local late = 0
  for _, head in ipairs(delayed) do
    if head[1] == topic and (head[2] == '' or head[2] == group) then late = late + 1 end
  end
  out[#out + 1] = r1 + r2
  out[#out + 1] = p1 + p2
  out[#out + 1] = late
end
return out
"""

# ARGV: prefix of state keys. Returns {key, value, version, ...}.
LIST_STATE = r"""
local start = ARGV[1]
local keys
if start == '' then
  keys = redis.call('ZRANGEBYLEX', state_index_key(), '-', '+')
else
  keys = redis.call('ZRANGEBYLEX', state_index_key(), '[' .. start, '(' .. start .. '\255')
end
local out = {}
for _, key in ipairs(keys) do
  local v = redis.call('HMGET', state_key(key), 'v', 'n')
  if v[1] then
    out[#out + 1] = key
    out[#out + 1] = v[1]
    out[#out + 1] = v[2]
  end
end
return out
"""
