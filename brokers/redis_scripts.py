"""Lua sources of the Redis Streams adapter's delivery path (see
``brokers.redis_streams``): the shared helpers, FETCH and READ. The commit
script is in ``brokers.redis_commit``, lease renewal's in
``brokers.redis_leases``, the operations scripts are in ``brokers.redis_admin``.

Every multi-step operation is one script, so it is atomic on the server.
Scripts name keys with the functions of ``Keys.lua`` (``stream_key``,
``seen_key``, ...), which the broker puts in front of each source when it
connects (``render``): the key layout is written down only in ``Keys``.
Scripts that write validate everything before their first write call: Lua has
no rollback.
"""

from __future__ import annotations

from brokers.redis_keys import Keys

__all__ = ("COMMON", "FETCH", "READ", "SETTLED", "UNREADABLE", "render")


def render(keys: Keys, source: str, *, bucket_cap: int = 1) -> str:
    """``source`` ready to load: the key functions of ``keys`` in front of it,
    and ``BUCKET_CAP``, the most message ids a dedupe bucket takes
    (``dedupe_max / 2``: a group keeps its current bucket and the one before)."""
    return f"{keys.lua()}local BUCKET_CAP = {max(1, int(bucket_cap))}\n{source}"

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
# Why an entry read for the first time may not be handed out, if so: the
# same reasons, in the same words, as ``brokers.redis_reads._unreadable``.
UNREADABLE = r"""
local function unreadable(mid, body, max_size)
  if mid == nil then return 'unreadable entry: missing field "id"' end
  if body == nil then return 'unreadable entry: missing field "body"' end
  if max_size > 0 and #body > max_size then
    return 'oversized entry: ' .. #body .. ' bytes, over the ' .. max_size .. '-byte limit'
  end
  return nil
end
"""

FETCH = COMMON + UNREADABLE + r"""
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
local by_group, group_order = {}, {}
-- The last entry id each stream gave in this call: when that read reached the
-- stream's end, it is the stream's tail (nothing is added while a script runs).
local last_read = {}

local function examine(index, s, eid, flat, count)
  local mid, body
  for i = 1, #flat, 2 do
    if flat[i] == 'id' then mid = flat[i + 1] elseif flat[i] == 'body' then body = flat[i + 1] end
  end
  -- Redis hands a script whole entries, but the consumer never gets an oversized one.
  local reason = unreadable(mid, body, max_size)
  if reason == nil and count > max_deliveries then
    reason = 'max deliveries exceeded'
    count = count - 1
  end
  if reason then
    dead_letter(s.topic, s.group, mid or false, body or '', reason, count, now, keep)
    buried[#buried + 1] = {s.topic, s.group, eid, reason}
  else
    -- Marked a duplicate or not below, once per group for all its entries.
    out[#out + 1] = {index, eid, mid, body, count, 0}
    local asked = by_group[s.group]
    if asked == nil then
      asked = {}
      by_group[s.group] = asked
      group_order[#group_order + 1] = s.group
    end
    asked[#asked + 1] = #out
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
    last_read[index] = entries[#entries][1]
    if #entries < asked then break end
  end
end

-- An id already settled in the group is handed out marked (1), not dropped:
-- only the consumer can read the body and see whether it is the same event
-- or another one written under a reused id. One HMGET per group and bucket.
for _, group in ipairs(group_order) do
  local rows = by_group[group]
  local head = redis.call('HMGET', seen_head_key(group), 'n')
  local n = tonumber(head[1])
  if n ~= nil then
    for first = 1, #rows, 1000 do
      local ids = {}
      for j = first, math.min(first + 999, #rows) do ids[#ids + 1] = out[rows[j]][3] end
      for _, bucket in ipairs({n, n - 1}) do
        local found = redis.call('HMGET', seen_key(group, tostring(bucket)), unpack(ids))
        for j, value in ipairs(found) do
          if value then out[rows[first + j - 1]][6] = 1 end
        end
      end
    end
  end
end

-- Every stream read to its end (room left, nothing missing): tell the caller
-- where each stream ends, so that its next wait can block on XREAD from
-- exactly there without missing what arrives meanwhile.
local tails = {}
if drained and remaining > 0 and #missing == 0 then
  for index, s in ipairs(streams) do
    if last_read[index] then
      tails[index] = last_read[index]
    else
      local last = redis.call('XREVRANGE', s.key, '+', '-', 'COUNT', 1)
      if #last > 0 then tails[index] = last[1][1] else tails[index] = '0-0' end
    end
  end
end
return {out, read_any, missing, cursors, tails, next_due, buried}
"""

# Which message ids a group settled already, for the scripts that mark
# duplicates without reading (MARK) and while reading (READ).
SETTLED = r"""
-- Per id of ``list[from .. from + n - 1]``, 1 if ``group`` settled it already,
-- else 0: one HGET of the group's head and one HMGET per dedupe bucket (the
-- current one and the one before) and thousand ids.
local function settled(group, list, from, n)
  local flags = {}
  for j = 1, n do flags[j] = 0 end
  local head = redis.call('HGET', seen_head_key(group), 'n')
  if head then
    local b = tonumber(head)
    for first = 1, n, 1000 do
      local last = math.min(first + 999, n)
      for _, bucket in ipairs({b, b - 1}) do
        local found = redis.call('HMGET', seen_key(group, tostring(bucket)),
                                 unpack(list, from + first - 1, from + last - 1))
        for j, value in ipairs(found) do
          if value then flags[first + j - 1] = 1 end
        end
      end
    end
  end
  return flags
end
"""

# ARGV: consumer, limit, max_size (0: none), bytes kept of an oversized entry,
# then per group: the group, its number of streams, and per stream its key
# and topic. One XREADGROUP per group (COUNT ``limit`` per stream), as a
# plain read sends it, with the duplicate marks of MARK and the dead letters
# of BURY done on the spot: queued behind a blocking XREAD, an entry that
# wakes it is handed out in that one round trip.
# Returns {deliveries, last, full, buried, missing}: each delivery is
# {stream index, entry id, message id, body, duplicate}; last holds per
# stream (in ARGV order) the last entry id read, '' if none; full is 1 if a
# stream gave ``limit`` entries; buried lists {stream index, entry id,
# reason} dead-lettered here; missing, the indexes of streams whose group
# is gone (NOGROUP).
READ = COMMON + SETTLED + UNREADABLE + r"""
local consumer, limit, max_size, keep = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local out, last, full, buried, missing = {}, {}, 0, {}, {}
local now = false
local first, at = 0, 5
while at <= #ARGV do
  local group, n = ARGV[at], tonumber(ARGV[at + 1])
  local args, index, topics = {'GROUP', group, consumer, 'COUNT', limit, 'STREAMS'}, {}, {}
  for j = 1, n do
    local key = ARGV[at + 2 * j]
    args[6 + j], args[6 + n + j] = key, '>'
    index[key], topics[first + j] = first + j, ARGV[at + 2 * j + 1]
    last[first + j] = ''
  end
  local r = redis.pcall('XREADGROUP', unpack(args))
  if type(r) == 'table' and r.err then
    if string.sub(r.err, 1, 7) ~= 'NOGROUP' then return r end
    for j = 1, n do missing[#missing + 1] = first + j end
  elseif r then
    local ids, rows = {}, {}
    for _, stream in ipairs(r) do
      local i, entries = index[stream[1]], stream[2]
      if #entries >= tonumber(limit) then full = 1 end
      if #entries > 0 then last[i] = entries[#entries][1] end
      for _, entry in ipairs(entries) do
        local eid, flat = entry[1], entry[2]
        local mid, body
        if #flat == 4 and flat[1] == 'id' and flat[3] == 'body' then
          mid, body = flat[2], flat[4]
        else
          for k = 1, #flat - 1, 2 do
            if flat[k] == 'id' then mid = flat[k + 1] elseif flat[k] == 'body' then body = flat[k + 1] end
          end
        end
        local reason = unreadable(mid, body, max_size)
        if reason then
          now = now or now_ms()
          dead_letter(topics[i], group, mid or false, body or '', reason, 1, now, keep)
          redis.call('XACK', stream[1], group, eid)
          buried[#buried + 1] = {i, eid, reason}
        else
          out[#out + 1] = {i, eid, mid, body, 0}
          ids[#ids + 1], rows[#rows + 1] = mid, #out
        end
      end
    end
    if #ids > 0 then
      for j, flag in ipairs(settled(group, ids, 1, #ids)) do out[rows[j]][5] = flag end
    end
  end
  first, at = first + n, at + 2 + 2 * n
end
return {out, last, full, buried, missing}
"""
