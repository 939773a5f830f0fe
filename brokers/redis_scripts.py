"""Lua sources of the Redis Streams adapter's delivery path (see
``brokers.redis_streams``; the operations scripts are in ``brokers.redis_admin``).

Every multi-step operation is one script, so it is atomic on the server.
Scripts name keys with the functions of ``Keys.lua`` (``stream_key``,
``seen_key``, ...), which the broker puts in front of each source when it
connects (``render``): the key layout is written down only in ``Keys``.
Scripts that write validate everything before their first write call: Lua has
no rollback.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from brokers.base import BrokerError, Delivery, Message, StateWrite, check_name
from brokers.redis_keys import Keys
from brokers.wire import dumps, quote, quote_name

__all__ = ("COMMIT_BATCH", "COMMON", "EXTEND", "FETCH", "commit_args", "render")


def commit_args(
    delivery: Delivery | None,
    located: tuple[str, str] | None,
    dead_letter: str | None,
    state: Sequence[StateWrite],
    messages: Sequence[Message],
    done: bool,
    dedupe_ms: int,
) -> tuple[list[Any], float | None]:
    """One commit's arguments for COMMIT_BATCH (see the layout above the
    script) and the soonest delay of its messages, in seconds. ``dedupe_ms``:
    how long the dedupe record is kept, in milliseconds (at least 1).

    Every name and id goes into one JSON header and only the bodies and values
    travel as separate arguments: packing a command costs per argument, and a
    commit is sent for every delivery.

    Raises:
        BrokerError: an invalid topic or group name, or a body that is not bytes.
    """
    blobs: list[Any] = [b""]
    if delivery is None or located is None:
        settle = "false"
    else:
        key, entry = located
        mid = delivery.message_id
        # The header is written out, not built and then encoded: it is made for
        # every commit. Layout: see above COMMIT_BATCH.
        # Entry ids are Redis stream ids (digits and a dash): nothing to escape.
        dead = '"",false' if dead_letter is None else f"{quote(dead_letter)},true"
        settle = (
            f'[{quote_name(key)},{quote_name(delivery.group)},{quote_name(delivery.consumer)},"{entry}",'
            f"{int(delivery.deliveries)},{quote(mid or '')},{_BOOL[mid is not None]},{_BOOL[bool(done)]},"
            f"{dedupe_ms},{dead},{quote_name(delivery.topic)},{_BOOL[delivery.duplicate]}]"
        )
        if dead_letter is not None:
            blobs.append(delivery.body)
    writes = []
    for write in state:
        writes.append([write.key, write.value is not None, write.expected_version])
        blobs.append(write.value or b"")
    heads = []
    soonest: float | None = None
    for m in messages:
        check_name("topic", m.topic)
        if m.group is not None:
            check_name("group", m.group)
        if type(m.body) is not bytes and not isinstance(m.body, bytes | bytearray):
            raise BrokerError(f"message {m.id!r} body must be bytes, not {type(m.body).__name__}")
        delay_ms = max(0, round(m.delay * 1000)) if m.delay else 0
        if delay_ms:
            soonest = delay_ms / 1000 if soonest is None else min(soonest, delay_ms / 1000)
        heads.append(f"[{quote_name(m.topic)},{quote_name(m.group or '')},{quote(m.id)},{delay_ms}]")
        blobs.append(m.body if type(m.body) is bytes else bytes(m.body))
    # Names travel as UTF-8, exactly as redis-py would send them.
    blobs[0] = f"[{settle},{dumps(writes) if writes else '[]'},[{','.join(heads)}]]".encode()
    return blobs, soonest


_BOOL = ("false", "true")


def render(keys: Keys, source: str) -> str:
    """``source`` ready to load: the key functions of ``keys`` in front of it."""
    return keys.lua() + source

# Shared helpers, prepended to every script that needs them.
COMMON = r"""
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- ``keep``: with a body longer than this, only its first ``keep`` bytes are
-- recorded, beside its size and SHA-1 (an oversized entry).
local function dead_letter(topic, group, message_id, body, reason, deliveries, at_ms, keep)
  local kept = body
  if keep and #body > keep then kept = string.sub(body, 1, keep) end
  local fields = {'topic', topic, 'group', group, 'body', kept, 'reason', reason,
                  'deliveries', tostring(deliveries), 'dead_at', string.format('%.3f', at_ms / 1000)}
  if kept ~= body then
    fields[#fields + 1] = 'size'
    fields[#fields + 1] = tostring(#body)
    fields[#fields + 1] = 'sha1'
    fields[#fields + 1] = redis.sha1hex(body)
  end
  if message_id then
    fields[#fields + 1] = 'message_id'
    fields[#fields + 1] = message_id
  end
  redis.call('XADD', dead_key(), '*', unpack(fields))
end

local function publish(now, topic, group, id, body, delay_ms)
  if delay_ms > 0 then
    -- Members carry their destination: a JSON header, a newline, the body.
    local member = cjson.encode({topic, group, id}) .. '\n' .. body
    redis.call('ZADD', delayed_key(), now + delay_ms, member)
  else
    redis.call('XADD', stream_key(topic, group), '*', 'id', id, 'body', body)
  end
end

-- The pending entry of ``eid``, if ``consumer`` holds it and it was handed out
-- exactly ``deliveries`` times (a reclaim bumps the count: that is the fence).
local function owns(skey, group, consumer, eid, deliveries)
  local p = redis.pcall('XPENDING', skey, group, eid, eid, 1)
  if type(p) ~= 'table' or p.err or #p == 0 then return false end
  return p[1][2] == consumer and tonumber(p[1][4]) == deliveries
end
"""

# ARGV: consumer, limit, max_deliveries, move_delayed (0/1), min_idle_ms,
# max_size (0: none), bytes kept of an oversized entry, then per stream: key,
# topic, group, claim (0/1), XAUTOCLAIM cursor.
# Returns {deliveries, read_any, missing, cursors, tails, next_due_ms, buried};
# each delivery is {stream index, entry id, message id, body, deliveries,
# duplicate}; tails (each stream's last entry id) only if every stream was
# read to its end; buried lists what this call dead-lettered, each as
# {topic, group, entry id, reason}, for the caller to log.
FETCH = COMMON + r"""
local consumer = ARGV[1]
local remaining = tonumber(ARGV[2])
local max_deliveries = tonumber(ARGV[3])
local move_delayed = ARGV[4] == '1'
local min_idle = tonumber(ARGV[5])
local max_size = tonumber(ARGV[6])
local keep = tonumber(ARGV[7])
local streams = {}
for i = 8, #ARGV, 5 do
  streams[#streams + 1] = {key = ARGV[i], topic = ARGV[i + 1], group = ARGV[i + 2],
                           claim = ARGV[i + 3] == '1', cursor = ARGV[i + 4]}
end
local now = now_ms()
local next_due = -1
local buried = {}

if move_delayed then
  local dkey = delayed_key()
  local due = redis.call('ZRANGEBYSCORE', dkey, '-inf', now, 'LIMIT', 0, 1000)
  for _, member in ipairs(due) do
    local cut = string.find(member, '\n', 1, true)
    local ok, head = false, nil
    if cut then ok, head = pcall(cjson.decode, string.sub(member, 1, cut - 1)) end
    if ok and type(head) == 'table' and type(head[1]) == 'string' and type(head[3]) == 'string' then
      local group = head[2]
      if type(group) ~= 'string' then group = '' end
      redis.call('XADD', stream_key(head[1], group), '*', 'id', head[3],
                 'body', string.sub(member, cut + 1))
    else
      dead_letter('', '', false, member, 'unreadable delayed message', 0, now, keep)
      buried[#buried + 1] = {'', '', '', 'unreadable delayed message'}
    end
    redis.call('ZREM', dkey, member)
  end
  local first = redis.call('ZRANGE', dkey, 0, 0, 'WITHSCORES')
  if #first > 0 then next_due = math.max(0, tonumber(first[2]) - now) end
end

local out, read_any, missing, cursors = {}, 0, {}, {}

local function examine(index, s, eid, flat, count)
  local mid, body
  for i = 1, #flat, 2 do
    if flat[i] == 'id' then mid = flat[i + 1] elseif flat[i] == 'body' then body = flat[i + 1] end
  end
  local reason
  if mid == nil then
    reason = 'unreadable entry: missing field "id"'
  elseif body == nil then
    reason = 'unreadable entry: missing field "body"'
  elseif max_size > 0 and #body > max_size then
    -- Redis hands a script whole entries, but the consumer never gets this one.
    reason = 'oversized entry: ' .. #body .. ' bytes, over the ' .. max_size .. '-byte limit'
  elseif count > max_deliveries then
    reason = 'max deliveries exceeded'
    count = count - 1
  end
  if reason then
    dead_letter(s.topic, s.group, mid or false, body or '', reason, count, now, keep)
    buried[#buried + 1] = {s.topic, s.group, eid, reason}
  else
    -- An id already settled in this group is handed out marked (1), not
    -- dropped: only the consumer can read the body and see whether it is
    -- the same event or another one written under a reused id.
    local duplicate = 0
    if redis.call('EXISTS', seen_key(s.group, mid)) == 1 then duplicate = 1 end
    out[#out + 1] = {index, eid, mid, body, count, duplicate}
    remaining = remaining - 1
    return
  end
  redis.call('XACK', s.key, s.group, eid)
end

for index, s in ipairs(streams) do
  cursors[index] = s.cursor
  if s.claim and remaining > 0 then
    local r = redis.pcall('XAUTOCLAIM', s.key, s.group, consumer, min_idle, s.cursor, 'COUNT', remaining)
    if type(r) == 'table' and r.err then
      missing[#missing + 1] = index
    else
      cursors[index] = r[1]
      for _, entry in ipairs(r[2]) do
        local p = redis.call('XPENDING', s.key, s.group, entry[1], entry[1], 1)
        local count = 1
        if #p > 0 then count = tonumber(p[1][4]) end
        examine(index, s, entry[1], entry[2], count)
      end
    end
  end
end

local drained = #missing == 0
for index, s in ipairs(streams) do
  local rounds = 0
  while remaining > 0 do
    if rounds == 50 then
      drained = false
      break
    end
    rounds = rounds + 1
    local r = redis.pcall('XREADGROUP', 'GROUP', s.group, consumer, 'COUNT', remaining,
                          'STREAMS', s.key, '>')
    if type(r) == 'table' and r.err then
      missing[#missing + 1] = index
      break
    end
    if not r then break end
    local entries = r[1][2]
    if #entries == 0 then break end
    read_any = 1
    local asked = remaining
    for _, entry in ipairs(entries) do examine(index, s, entry[1], entry[2], 1) end
    if #entries < asked then break end
  end
end

-- Every stream read to its end (room left, nothing missing): tell the caller
-- where each stream ends, so that its next wait can block on XREAD from
-- exactly there without missing what arrives meanwhile.
local tails = {}
if drained and remaining > 0 and #missing == 0 then
  for index, s in ipairs(streams) do
    local last = redis.call('XREVRANGE', s.key, '+', '-', 'COUNT', 1)
    if #last > 0 then tails[index] = last[1][1] else tails[index] = '0-0' end
  end
end
return {out, read_any, missing, cursors, tails, next_due, buried}
"""

# One commit's arguments (``commit_args``), seen as ``ARGV`` inside ``commit``.
# ARGV[1]: a JSON header [settle, writes, messages]:
#   settle: false, or [stream key, group, consumer, entry id, deliveries,
#     message id, has message id, done, dedupe ttl ms, dead reason,
#     has dead letter, topic, handed out marked duplicate];
#   writes: [[state key, has value, expected version], ...];
#   messages: [[topic, group, id, delay ms], ...].
# ARGV[2...]: the bytes, in order: the dead letter's body (only with a dead
# letter), each write's value, each message's body.
_COMMIT_ONE = r"""
local function commit(ARGV)
  local h = cjson.decode(ARGV[1])
  local settle, writes, messages = h[1], h[2], h[3]
  local at = 2
  local body = ''
  if settle and settle[11] then
    body = ARGV[at]
    at = at + 1
  end
  local first_value = at
  local first_body = at + #writes

  local skey, group, eid, deliveries
  if settle then
    skey, group, eid, deliveries = settle[1], settle[2], settle[4], settle[5]
    if not owns(skey, group, settle[3], eid, deliveries) then return 'lease_lost' end
    if settle[7] and not (settle[11] and settle[13]) and redis.call('EXISTS', seen_key(group, settle[6])) == 1 then
      -- A duplicate that was in flight while the original settled: ack it,
      -- nothing else. A delivery handed out marked as a duplicate may still
      -- be dead-lettered: its consumer found another message under the id.
      redis.call('XACK', skey, group, eid)
      return 'duplicate'
    end
  end
  for _, w in ipairs(writes) do
    local current = redis.call('HGET', state_key(w[1]), 'n')
    if (tonumber(current) or 0) ~= w[3] then return 'conflict' end
  end

  -- Validated: from here on every call writes.
  local now = now_ms()
  for i, m in ipairs(messages) do
    publish(now, m[1], m[2], m[3], ARGV[first_body + i - 1], m[4])
  end
  local index = state_index_key()
  for i, w in ipairs(writes) do
    local key = state_key(w[1])
    if w[2] then
      redis.call('HSET', key, 'v', ARGV[first_value + i - 1], 'n', w[3] + 1)
      redis.call('ZADD', index, 0, w[1])
    else
      redis.call('DEL', key)
      redis.call('ZREM', index, w[1])
    end
  end
  if settle then
    if settle[11] then
      local message_id = false
      if settle[7] then message_id = settle[6] end
      dead_letter(settle[12], group, message_id, body, settle[10], deliveries, now)
    end
    if settle[8] and settle[7] then
      redis.call('SET', seen_key(group, settle[6]), '1', 'PX', settle[9])
    end
    redis.call('XACK', skey, group, eid)
  end
  return 'ok'
end
"""

# ARGV: the number of commits, then for each: its argument count and its
# arguments (``commit_args``). Returns one reply per commit, in order: a status
# string, or an error reply if that commit failed (the others are unaffected).
# Each commit is fenced and validated on its own, exactly as if it were a
# script of its own; one script for the batch saves a command, a reply and
# their parsing per commit.
COMMIT_BATCH = COMMON + _COMMIT_ONE + r"""
local replies = {}
local at = 2
for i = 1, tonumber(ARGV[1]) do
  local n = tonumber(ARGV[at])
  local argv = {}
  for j = 1, n do argv[j] = ARGV[at + j] end
  at = at + n + 1
  local ok, result = pcall(commit, argv)
  if ok then
    replies[i] = result
  elseif type(result) == 'table' and result.err then
    replies[i] = result
  else
    replies[i] = {err = 'ERR commit failed: ' .. tostring(result)}
  end
end
return replies
"""

# ARGV: stream key, group, consumer, entry id, deliveries. Returns 1 or 0.
EXTEND = COMMON + r"""
if not owns(ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])) then return 0 end
-- JUSTID resets the idle time without bumping the delivery counter.
redis.call('XCLAIM', ARGV[1], ARGV[2], ARGV[3], 0, ARGV[4], 'JUSTID')
return 1
"""
