"""The commit script of the Redis Streams adapter (``COMMIT_BATCH``) and the
arguments of one commit (``commit_args``); the shared Lua helpers are in
``brokers.redis_scripts``, which also explains how scripts name their keys."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from brokers.base import BrokerError, Delivery, Message, StateWrite, check_name
from brokers.redis_scripts import COMMON
from brokers.speedups import remember

__all__ = ("COMMIT_BATCH", "commit_args")


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

    Every name and id goes into one binary header and only the bodies and
    values travel as separate arguments: each argument costs Redis a string
    object and a Lua string, and the header is read with one ``struct.unpack``
    per part, which measured about half the instructions of ``cjson.decode``
    on the same fields.

    Raises:
        BrokerError: an invalid topic or group name, a name or id that is not
            valid Unicode, or a body that is not bytes.
    """
    blobs: list[Any] = [b""]
    try:
        if delivery is None or located is None:
            parts = [_NO_SETTLE]
        else:
            key, entry = located
            mid = delivery.message_id
            flags = _SETTLE | (_HAS_ID if mid is not None else 0) | (_DONE if done else 0) | (
                _DEAD if dead_letter is not None else 0) | (_MARKED if delivery.duplicate else 0)
            parts = [
                _BYTE[flags], _name(key), _name(delivery.group), _name(delivery.consumer), _text(entry),
                _U32.pack(int(delivery.deliveries)), _text(mid or ""), _I64.pack(dedupe_ms),
                _text(dead_letter or ""), _name(delivery.topic),
            ]
            if dead_letter is not None:
                blobs.append(delivery.body)
        parts.append(_COUNTS.pack(len(state), len(messages)))
        for write in state:
            parts += (_name(write.key), _BYTE[write.value is not None], _I64.pack(write.expected_version))
            blobs.append(write.value or b"")
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
            parts += (_name(m.topic), _name(m.group or ""), _text(m.id), _I64.pack(delay_ms))
            blobs.append(m.body if type(m.body) is bytes else bytes(m.body))
    except UnicodeEncodeError as exc:
        raise BrokerError(f"a name or id of this commit is not valid Unicode: {exc}") from None
    blobs[0] = b"".join(parts)
    return blobs, soonest


_SETTLE, _HAS_ID, _DONE, _DEAD, _MARKED = 1, 2, 4, 8, 16
_BYTE = tuple(bytes((n,)) for n in range(32))
_U32 = struct.Struct(">I")
_I64 = struct.Struct(">q")
_COUNTS = struct.Struct(">II")
_names: dict[str, bytes] = {}


def _text(value: str) -> bytes:
    """A string as the header holds it: its UTF-8 length, then its bytes."""
    data = value.encode()
    return _U32.pack(len(data)) + data


def _name(name: str) -> bytes:
    """``_text`` for names met on every commit (keys, groups, topics): remembered."""
    packed = _names.get(name)
    if packed is None:
        packed = remember(_names, name, _text(name))
    return packed


#: The header of a commit that settles no delivery: no flags, empty fields.
_NO_SETTLE = b"".join([_BYTE[0], _text(""), _text(""), _text(""), _text(""), _U32.pack(0), _text(""),
                       _I64.pack(0), _text(""), _text("")])


# One commit's arguments (``commit_args``), seen as ``ARGV`` inside ``commit``.
# ARGV[1]: a binary header, big-endian, each string as a 4-byte length and
#   its UTF-8 bytes (``struct`` format ``I4c0``):
#   flags (1 byte: 1 settles a delivery, 2 has a message id, 4 done, 8 dead
#     letter, 16 handed out marked duplicate), stream key, group, consumer,
#     entry id, deliveries (4 bytes), message id, dedupe ttl ms (8 bytes),
#     dead reason, topic (without a delivery to settle: all empty or 0);
#   the number of writes and of messages (4 bytes each);
#   each write: state key, has value (1 byte), expected version (8 bytes);
#   each message: topic, group, id, delay ms (8 bytes).
# ARGV[2...]: the bytes, in order: the dead letter's body (only with a dead
# letter), each write's value, each message's body.
#
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
    local q = queue_of(st[1], st[2])
    local ms, seq = id_parts(st[4])
    local r = q.ranges[st[3]]
    if r == nil then
      r = {q, st[3], ms, seq, ms, seq, {}, st[4], st[4]}
      q.ranges[st[3]] = r
      ranges[#ranges + 1] = r
    elseif ms < r[3] or (ms == r[3] and seq < r[4]) then
      r[3], r[4], r[8] = ms, seq, st[4]
    elseif ms > r[5] or (ms == r[5] and seq > r[6]) then
      r[5], r[6], r[9] = ms, seq, st[4]
    end
    r[7][#r[7] + 1] = st[4]
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

-- A header as {settle, writes, messages} (see the layout above); settle is
-- false, or {stream key, group, consumer, entry id, deliveries, message id,
-- has message id, done, dedupe ttl ms, dead reason, has dead letter, topic,
-- handed out marked duplicate}.
local SETTLE_FORMAT = '>BI4c0I4c0I4c0I4c0I4I4c0i8I4c0I4c0I4I4'
local function read_header(h)
  local flags, skey, group, consumer, eid, deliveries, mid, ttl, reason, topic, nw, nm, pos =
    struct.unpack(SETTLE_FORMAT, h)
  local settle = false
  if flags % 2 == 1 then
    local function bit(b) return math.floor(flags / b) % 2 == 1 end
    settle = {skey, group, consumer, eid, deliveries, mid, bit(2), bit(4), ttl, reason, bit(8), topic, bit(16)}
  end
  local writes, messages = {}, {}
  for j = 1, nw do
    local key, has, version
    key, has, version, pos = struct.unpack('>I4c0Bi8', h, pos)
    writes[j] = {key, has == 1, version}
  end
  for j = 1, nm do
    local t, g, id, delay
    t, g, id, delay, pos = struct.unpack('>I4c0I4c0I4c0i8', h, pos)
    messages[j] = {t, g, id, delay}
  end
  return {settle, writes, messages}
end

local function prepare(argvs)
  now = now_ms()
  local settles, asked, ttls = {}, {}, {}
  for i, argv in ipairs(argvs) do
    local ok, h = pcall(read_header, argv[1])
    if ok then
      headers[i] = h
      local st = h[1]
      if st then
        settles[#settles + 1] = st
        if st[7] and st[9] > 0 then  -- a ttl of 0 turns dedupe off
          asked[st[2]] = asked[st[2]] or {}
          if not (st[11] and st[13]) then table.insert(asked[st[2]], st[6]) end
          ttls[st[2]] = st[9]
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
  local settle, writes, messages = h[1], h[2], h[3]
  local at = 2
  local body = ''
  if settle and settle[11] then
    body = ARGV[at]
    at = at + 1
  end
  local first_value = at
  local first_body = at + #writes

  local group, eid, deliveries, q
  if settle then
    group, eid, deliveries = settle[2], settle[4], settle[5]
    q = queues[settle[1]][group]
    if q.settled[eid] or q.owner[eid] ~= settle[3] or q.count[eid] ~= deliveries then return 'lease_lost' end
    local d = dedupe[group]
    if settle[7] and not (settle[11] and settle[13]) and d and d.ids[settle[6]] then
      -- A duplicate that was in flight while the original settled: ack it,
      -- nothing else. A delivery handed out marked as a duplicate may still
      -- be dead-lettered: its consumer found another message under the id.
      queue_ack(q, eid, i)
      return 'duplicate'
    end
  end
  for _, w in ipairs(writes) do
    local current = redis.call('HGET', state_key(w[1]), 'n')
    if (tonumber(current) or 0) ~= w[3] then return 'conflict' end
  end

  -- Validated: from here on every call writes.
  for j, m in ipairs(messages) do
    publish(now, m[1], m[2], m[3], ARGV[first_body + j - 1], m[4])
  end
  local index = state_index_key()
  for j, w in ipairs(writes) do
    local key = state_key(w[1])
    if w[2] then
      redis.call('HSET', key, 'v', ARGV[first_value + j - 1], 'n', w[3] + 1)
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
    if settle[8] and settle[7] and settle[9] > 0 then
      local d = dedupe[group] or fetch_dedupe(group, {}, settle[9])
      if not d.ids[settle[6]] then
        d.ids[settle[6]] = true
        d.fresh[#d.fresh + 1] = settle[6]
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
