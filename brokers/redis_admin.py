"""The operations side of the Redis Streams adapter: retention, the state
listing, consumer backlog and dead letters (``RedisStreamsBroker`` mixes it
in), and the Lua scripts they run. These calls are rare next to fetch and
commit, so they favour plain commands over batching.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from redis import exceptions as rexc

from brokers.base import BrokerError, DeadLetterRecord, GroupBacklog, Subscription, Versioned, check_name
from brokers.options import BrokerOptions
from brokers.redis_scripts import COMMON
from brokers.redis_support import Stream, dead_letter_record, is_stream_id, text

__all__ = ("BACKLOG", "LIST_STATE", "REPLAY", "TRIM", "RedisAdmin")


class _Host(Protocol):
    """What the mixin needs from the broker it is part of."""

    url: str
    options: BrokerOptions
    _prefix: str
    _known: dict[str, Stream]

    def _redis(self) -> Any: ...

    async def _run(self, script: str, args: Sequence[Any]) -> Any: ...


class RedisAdmin:
    """Retention, state listing, backlog and dead letters of ``RedisStreamsBroker``."""

    # -- retention -----------------------------------------------------------

    async def trim(self: _Host) -> int:
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

    async def get_state(self: _Host, key: str) -> Versioned | None:
        try:
            value, version = await self._redis().hmget(f"{self._prefix}:_state:{key}", ["v", "n"])
        except rexc.RedisError as exc:
            raise BrokerError(f"get_state failed on {self.url}: {exc}") from exc
        if value is None:
            return None
        return Versioned(value=bytes(value), version=int(version))

    async def list_state(self: _Host, prefix: str) -> dict[str, Versioned]:
        flat = await self._run("LIST_STATE", [self._prefix, prefix])
        return {
            text(flat[i]): Versioned(value=bytes(flat[i + 1]), version=int(flat[i + 2]))
            for i in range(0, len(flat), 3)
        }

    async def backlog(self: _Host, subscriptions: Sequence[Subscription]) -> list[GroupBacklog]:
        args: list[Any] = [self._prefix]
        for sub in subscriptions:
            check_name("topic", sub.topic)
            check_name("group", sub.group)
            args += [sub.topic, sub.group]
        flat = await self._run("BACKLOG", args)
        return [
            GroupBacklog(topic=sub.topic, group=sub.group, ready=int(flat[3 * i]),
                         pending=int(flat[3 * i + 1]), delayed=int(flat[3 * i + 2]))
            for i, sub in enumerate(subscriptions)
        ]

    async def dead_letters(self: _Host, limit: int = 1000) -> list[DeadLetterRecord]:
        try:
            entries = await self._redis().xrange(f"{self._prefix}:_dead", count=max(1, limit))
        except rexc.RedisError as exc:
            raise BrokerError(f"dead_letters failed on {self.url}: {exc}") from exc
        return [dead_letter_record(entry_id, fields) for entry_id, fields in entries]

    async def replay(self: _Host, dead_letter_id: str) -> bool:
        if not is_stream_id(dead_letter_id):
            return False
        return bool(await self._run("REPLAY", [self._prefix, dead_letter_id]))

    async def purge_dead_letters(self: _Host, ids: Sequence[str] | None = None) -> int:
        key = f"{self._prefix}:_dead"
        try:
            if ids is None:
                pipe = self._redis().pipeline(transaction=True)
                pipe.xlen(key)
                pipe.delete(key)
                count, _ = await pipe.execute()
                return int(count)
            valid = [i for i in ids if is_stream_id(i)]
            return int(await self._redis().xdel(key, *valid)) if valid else 0
        except rexc.RedisError as exc:
            raise BrokerError(f"purge_dead_letters failed on {self.url}: {exc}") from exc


# ARGV: prefix, dead letter id. Returns 1, or 0 if there is no such letter.
REPLAY = COMMON + r"""
local prefix, id = ARGV[1], ARGV[2]
local dkey = prefix .. ':_dead'
local found = redis.call('XRANGE', dkey, id, id)
if #found == 0 then return 0 end
local f = {}
local flat = found[1][2]
for i = 1, #flat, 2 do f[flat[i]] = flat[i + 1] end
local group = f.group or ''
local fields = {'body', f.body or ''}
if f.message_id then
  fields[3] = 'id'
  fields[4] = f.message_id
  if group ~= '' then redis.call('DEL', prefix .. ':_seen:' .. group .. ':' .. f.message_id) end
end
redis.call('XADD', stream_key(prefix, f.topic or '', group), '*', unpack(fields))
redis.call('XDEL', dkey, id)
return 1
"""

# ARGV: prefix, then per subscription: topic, group.
# Returns {ready, pending, delayed} per subscription, flattened.
BACKLOG = COMMON + r"""
local prefix = ARGV[1]

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
for _, member in ipairs(redis.call('ZRANGE', prefix .. ':_delayed', 0, -1)) do
  local cut = string.find(member, '\n', 1, true)
  if cut then
    local ok, head = pcall(cjson.decode, string.sub(member, 1, cut - 1))
    if ok and type(head) == 'table' then delayed[#delayed + 1] = head end
  end
end

local out = {}
for i = 2, #ARGV, 2 do
  local topic, group = ARGV[i], ARGV[i + 1]
  local r1, p1 = work(stream_key(prefix, topic, ''), group)
  local r2, p2 = work(stream_key(prefix, topic, group), group)
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

# ARGV: prefix, prefix of state keys. Returns {key, value, version, ...}.
LIST_STATE = r"""
local prefix, start = ARGV[1], ARGV[2]
local keys
if start == '' then
  keys = redis.call('ZRANGEBYLEX', prefix .. ':_state_keys', '-', '+')
else
  keys = redis.call('ZRANGEBYLEX', prefix .. ':_state_keys', '[' .. start, '(' .. start .. '\255')
end
local out = {}
for _, key in ipairs(keys) do
  local v = redis.call('HMGET', prefix .. ':_state:' .. key, 'v', 'n')
  if v[1] then
    out[#out + 1] = key
    out[#out + 1] = v[1]
    out[#out + 1] = v[2]
  end
end
return out
"""

# ARGV: maxlen, then per stream: key, private (0/1). Trims each stream to
# about maxlen entries, but never at or past the oldest entry that any group
# still has pending or has not been delivered yet. Returns entries removed.
TRIM = r"""
local maxlen = tonumber(ARGV[1])

local function split(id)
  local dash = string.find(id, '-', 1, true)
  return tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))
end

local function older(a, b)
  local am, as = split(a)
  local bm, bs = split(b)
  return am < bm or (am == bm and as < bs)
end

local removed = 0
for i = 2, #ARGV, 2 do
  local key, private = ARGV[i], ARGV[i + 1] == '1'
  local excess = redis.call('XLEN', key) - maxlen
  local groups = redis.pcall('XINFO', 'GROUPS', key)
  if excess > 0 and type(groups) == 'table' and not groups.err and not (private and #groups == 0) then
    local cut = redis.call('XRANGE', key, '-', '+', 'COUNT', math.min(excess, 10000) + 1)
    local bound = cut[#cut][1]
    for _, flat in ipairs(groups) do
      local g = {}
      for j = 1, #flat, 2 do g[flat[j]] = flat[j + 1] end
      local floor = g['last-delivered-id']
      if tonumber(g.pending) > 0 then
        local summary = redis.call('XPENDING', key, g.name)
        if older(summary[2], floor) then floor = summary[2] end
      end
      if older(floor, bound) then bound = floor end
    end
    removed = removed + redis.call('XTRIM', key, 'MINID', bound)
  end
end
return removed
"""
