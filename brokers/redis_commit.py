"""The commit script of the Redis Streams adapter (``COMMIT_BATCH``); the
arguments of one commit are made by ``commit_args``
(``brokers.redis_commit_header``), and the shared Lua helpers are in
``brokers.redis_scripts``, which also explains how scripts name their keys."""

from __future__ import annotations

from brokers.redis_commit_header import commit_args
from brokers.redis_scripts import COMMON

__all__ = ("COMMIT_BATCH", "commit_args")


# One commit's arguments are laid out by ``brokers.redis_commit_header``;
# the script reads them as ``ARGV`` inside ``commit``.
# A batch is read in three passes, so that what every commit needs from the
# server is fetched once per batch instead of once per commit (each call from
# Lua costs a few microseconds beyond the command's own work):
# 1. ``prepare`` decodes every header, then asks XPENDING once per stream,
#    group and consumer for the leases over the batch's range of entries (the
#    fence) and HMGET once per group and dedupe bucket for its message ids;
# 2. ``commit`` validates and applies each commit in order against those
#    answers and what earlier commits of the batch did (an entry settled or an
#    id recorded earlier in the batch counts as such), publishing and writing
#    state at once;
# 3. ``flush`` then acks each stream's settled entries with one XACK and
#    records each group's settled ids with one HSET, rotating its buckets.
# Nothing between the passes runs outside this script, so each commit still
# sees exactly what it would have seen as a script of its own.
_COMMIT_ONE = r"""
local now = 0
local headers = {}
local queues = {}   -- stream -> group -> the queue's record (see queue_of)
local queue_order = {}
local dedupe = {}   -- group -> {n, at, ttl, ids = {id -> true}, fresh = {ids}, commits = {}}
local dedupe_order = {}

-- One record per stream and group the batch settles in, looked up by the
-- strings the headers hold (no key is built per commit): the leases the
-- fence found (entry -> owner, entry -> deliveries), the entries settled so
-- far in this batch, and the acks to send with the commits they belong to.
local function queue_of(skey, group)
  local by_group = queues[skey]
  if by_group == nil then
    by_group = {}
    queues[skey] = by_group
  end
  local q = by_group[group]
  if q == nil then
    q = {skey = skey, group = group, owner = {}, count = {}, settled = {}, acks = {}, commits = {}, ranges = {}}
    by_group[group] = q
    queue_order[#queue_order + 1] = q
  end
  return q
end

local function id_parts(id)
  local dash = string.find(id, '-', 1, true)
  return tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))
end

-- What the fence needs, for every settle of the batch: one XPENDING per
-- stream, group and consumer over the range of the batch's entries (only
-- that consumer's leases come back); an entry past the reply's COUNT is
-- asked for on its own.
local function fetch_leases(settles)
  local ranges = {}
  for _, st in ipairs(settles) do
    local q = queue_of(st[2], st[3])
    local ms, seq = id_parts(st[5])
    local r = q.ranges[st[4]]
    if r == nil then
      r = {q, st[4], ms, seq, ms, seq, {}, st[5], st[5]}
      q.ranges[st[4]] = r
      ranges[#ranges + 1] = r
    elseif ms < r[3] or (ms == r[3] and seq < r[4]) then
      r[3], r[4], r[8] = ms, seq, st[5]
    elseif ms > r[5] or (ms == r[5] and seq > r[6]) then
      r[5], r[6], r[9] = ms, seq, st[5]
    end
    r[7][#r[7] + 1] = st[5]
  end
  for _, r in ipairs(ranges) do
    local q = r[1]
    local owner, count = q.owner, q.count
    local limit = #r[7] * 4 + 16
    local rows = redis.pcall('XPENDING', q.skey, q.group, r[8], r[9], limit, r[2])
    if type(rows) == 'table' and not rows.err then
      for _, row in ipairs(rows) do
        owner[row[1]] = row[2]
        count[row[1]] = tonumber(row[4])
      end
      if #rows >= limit then
        for _, eid in ipairs(r[7]) do
          if owner[eid] == nil then
            local p = redis.pcall('XPENDING', q.skey, q.group, eid, eid, 1)
            if type(p) == 'table' and not p.err and #p > 0 then
              owner[eid] = p[1][2]
              count[eid] = tonumber(p[1][4])
            end
          end
        end
      end
    end
  end
end

-- The group's dedupe records: its current bucket (from its head) and the one
-- before it, looked up once for every id the batch asks about.
local function fetch_dedupe(group, ids, ttl)
  local d = dedupe[group]
  if d == nil then
    local head = redis.call('HMGET', seen_head_key(group), 'n', 'at')
    d = {n = tonumber(head[1]) or 0, at = tonumber(head[2]), ttl = ttl, ids = {}, fresh = {}, commits = {}}
    dedupe[group] = d
    dedupe_order[#dedupe_order + 1] = group
  end
  if #ids > 0 then
    for _, bucket in ipairs({d.n, d.n - 1}) do
      local found = redis.call('HMGET', seen_key(group, tostring(bucket)), unpack(ids))
      for i, value in ipairs(found) do
        if value then d.ids[ids[i]] = true end
      end
    end
  end
  return d
end

-- A header as one flat table, so that a commit costs one table: h[1] flags,
-- h[2] stream key, h[3] group, h[4] consumer, h[5] entry id, h[6]
-- deliveries, h[7] message id, h[8] dedupe ttl ms, h[9] dead reason, h[10]
-- topic, h[11] writes, h[12] messages, h[13] where the writes begin in the
-- header; then each write as 3 values (state key, has value, expected
-- version) from h[14], then each message as 4 (topic, group, id, delay ms).
-- Flags: 1 settles, 2 has a message id, 4 done, 8 dead letter, 16 handed
-- out marked duplicate (tested with % and >=: Lua 5.1 has no bit operators).
local SETTLE_FORMAT = '>BI4c0I4c0I4c0I4c0i8I4c0i8I4c0I4c0I4I4'
local function read_header(raw)
  local h = {struct.unpack(SETTLE_FORMAT, raw)}
  local pos, n = h[13], 13
  for _ = 1, h[11] do
    local key, has, version
    key, has, version, pos = struct.unpack('>I4c0Bi8', raw, pos)
    h[n + 1], h[n + 2], h[n + 3] = key, has == 1, version
    n = n + 3
  end
  for _ = 1, h[12] do
    local topic, group, id, delay
    topic, group, id, delay, pos = struct.unpack('>I4c0I4c0I4c0i8', raw, pos)
    h[n + 1], h[n + 2], h[n + 3], h[n + 4] = topic, group, id, delay
    n = n + 4
  end
  return h
end

local function prepare(argvs)
  now = now_ms()
  local settles, asked, ttls = {}, {}, {}
  for i, argv in ipairs(argvs) do
    local ok, h = pcall(read_header, argv[1])
    if ok then
      headers[i] = h
      local flags = h[1]
      if flags % 2 == 1 then
        settles[#settles + 1] = h
        if flags % 4 >= 2 and h[8] > 0 then  -- a ttl of 0 turns dedupe off
          local group = h[3]
          asked[group] = asked[group] or {}
          if not (flags % 16 >= 8 and flags >= 16) then table.insert(asked[group], h[7]) end
          ttls[group] = h[8]
        end
      end
    else
      headers[i] = false
    end
  end
  fetch_leases(settles)
  for group, ids in pairs(asked) do fetch_dedupe(group, ids, ttls[group]) end
end

local function queue_ack(q, eid, i)
  q.acks[#q.acks + 1] = eid
  q.commits[#q.commits + 1] = i
  q.settled[eid] = true
end

local function commit(i, ARGV)
  local h = headers[i]
  if not h then return {err = 'ERR commit header is malformed'} end
  local flags, writes, messages = h[1], h[11], h[12]
  local settling, has_id, done = flags % 2 == 1, flags % 4 >= 2, flags % 8 >= 4
  local dead, marked = flags % 16 >= 8, flags >= 16
  local at = 2
  local body = ''
  if settling and dead then
    body = ARGV[at]
    at = at + 1
  end
  local first_value = at
  local first_body = at + writes
  local first_message = 14 + 3 * writes

  local group, eid, deliveries, mid, ttl, q
  if settling then
    group, eid, deliveries, mid, ttl = h[3], h[5], h[6], h[7], h[8]
    q = queues[h[2]][group]
    if q.settled[eid] or q.owner[eid] ~= h[4] or q.count[eid] ~= deliveries then return 'lease_lost' end
    local d = dedupe[group]
    if has_id and not (dead and marked) and d and d.ids[mid] then
      -- A duplicate that was in flight while the original settled: ack it,
      -- nothing else. A delivery handed out marked as a duplicate may still
      -- be dead-lettered: its consumer found another message under the id.
      queue_ack(q, eid, i)
      return 'duplicate'
    end
  end
  for j = 1, writes do
    local w = 11 + 3 * j
    local current = redis.call('HGET', state_key(h[w]), 'n')
    if (tonumber(current) or 0) ~= h[w + 2] then return 'conflict' end
  end

  -- Validated: from here on every call writes.
  for j = 1, messages do
    local m = first_message + 4 * (j - 1)
    publish(now, h[m], h[m + 1], h[m + 2], ARGV[first_body + j - 1], h[m + 3])
  end
  local index = state_index_key()
  for j = 1, writes do
    local w = 11 + 3 * j
    local key = state_key(h[w])
    if h[w + 1] then
      redis.call('HSET', key, 'v', ARGV[first_value + j - 1], 'n', h[w + 2] + 1)
      redis.call('ZADD', index, 0, h[w])
    else
      redis.call('DEL', key)
      redis.call('ZREM', index, h[w])
    end
  end
  if settling then
    if dead then
      local message_id = false
      if has_id then message_id = mid end
      dead_letter(h[10], group, message_id, body, h[9], deliveries, now)
    end
    if done and has_id and ttl > 0 then
      local d = dedupe[group] or fetch_dedupe(group, {}, ttl)
      if not d.ids[mid] then
        d.ids[mid] = true
        d.fresh[#d.fresh + 1] = mid
      end
      d.commits[#d.commits + 1] = i
    end
    queue_ack(q, eid, i)
  end
  return 'ok'
end

-- A new bucket starts with one field whose value is longer than Redis keeps
-- in a listpack, so it is a hash table from its first id on: in a listpack
-- each HMGET of a batch's ids would scan the bucket once per id (measured:
-- 17% of Redis's instructions in a short run). The field's name is no id a
-- producer would use; an entry that carries it anyway is handed out marked.
local function open_bucket(key)
  redis.call('HSET', key, '\n#bucket', string.rep('-', 80))
end

-- Rotation: a bucket takes ids until it holds BUCKET_CAP of them or is
-- ``ttl`` old; the bucket before the current one is deleted when a new one
-- begins. A record is so kept at least ``ttl`` (unless the count bound drops
-- it sooner), and a group never holds more than two buckets' worth.
local function flush(replies)
  local function fail(commits, err)
    for _, i in ipairs(commits) do
      if not (type(replies[i]) == 'table' and replies[i].err) then replies[i] = err end
    end
  end
  for _, group in ipairs(dedupe_order) do
    local d = dedupe[group]
    if #d.fresh > 0 then
      local ok, err = pcall(function()
        local key = seen_key(group, tostring(d.n))
        if d.at == nil then open_bucket(key) end
        for first = 1, #d.fresh, 1000 do
          local fields = {}
          for j = first, math.min(first + 999, #d.fresh) do
            fields[#fields + 1] = d.fresh[j]
            fields[#fields + 1] = '1'
          end
          redis.call('HSET', key, unpack(fields))
        end
        local keep = 2 * d.ttl
        redis.call('PEXPIRE', key, keep)
        local head = seen_head_key(group)
        if d.at == nil then
          redis.call('HSET', head, 'n', d.n, 'at', now)
        elseif redis.call('HLEN', key) >= BUCKET_CAP or now - d.at >= d.ttl then
          redis.call('HSET', head, 'n', d.n + 1, 'at', now)
          redis.call('DEL', seen_key(group, tostring(d.n - 1)))
          open_bucket(seen_key(group, tostring(d.n + 1)))
          redis.call('PEXPIRE', seen_key(group, tostring(d.n + 1)), keep)
        end
        redis.call('PEXPIRE', head, keep)
      end)
      if not ok then fail(d.commits, type(err) == 'table' and err or {err = 'ERR ' .. tostring(err)}) end
    end
  end
  for _, q in ipairs(queue_order) do
    for first = 1, #q.acks, 1000 do
      local r = redis.pcall('XACK', q.skey, q.group, unpack(q.acks, first, math.min(first + 999, #q.acks)))
      if type(r) == 'table' and r.err then fail(q.commits, r) end
    end
  end
end
"""

# ARGV: the number of commits, then for each: its argument count and its
# arguments (``commit_args``). Returns one reply per commit, in order: a status
# string, or an error reply if that commit failed (the others are unaffected).
# Each commit is fenced and validated on its own, exactly as if it were a
# script of its own (see the passes above); one script for the batch saves a
# command, a reply and their parsing per commit, and the passes save most of
# the calls a commit would make on its own.
COMMIT_BATCH = COMMON + _COMMIT_ONE + r"""
local argvs = {}
local at = 2
for i = 1, tonumber(ARGV[1]) do
  local n = tonumber(ARGV[at])
  local argv = {}
  for j = 1, n do argv[j] = ARGV[at + j] end
  argvs[i] = argv
  at = at + n + 1
end
prepare(argvs)
local replies = {}
for i, argv in ipairs(argvs) do
  local ok, result = pcall(commit, i, argv)
  if ok then
    replies[i] = result
  elseif type(result) == 'table' and result.err then
    replies[i] = result
  else
    replies[i] = {err = 'ERR commit failed: ' .. tostring(result)}
  end
end
flush(replies)
return replies
"""
