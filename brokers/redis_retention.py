"""Retention on Redis: the bounds a stream is trimmed to and the script that
trims (``TRIM``, run by ``RedisAdmin.trim`` every few seconds from ``fetch``).

Retention is on by default, so that Redis memory stays bounded at steady
state: a stream keeps its newest ``maxlen`` entries (``DEFAULT_MAXLEN`` when
not given) and nothing older than ``retention`` seconds (a day by default),
and only what every group is done with is ever trimmed. Sizing arithmetic:
docs/operations.md, "Memory per event and sizing".
"""

from __future__ import annotations

from brokers.options import BrokerOptions

__all__ = ("DEFAULT_MAXLEN", "TRIM", "retention_bounds")

#: Entries a stream keeps when ``maxlen`` is not given (about 40 MB for a
#: stream of 300-byte event bodies; see docs/operations.md).
DEFAULT_MAXLEN = 100_000


def retention_bounds(options: BrokerOptions, partitions: int = 1) -> tuple[int, int]:
    """The entries each stream keeps and their age in ms (0: no bound), as
    ``options`` set them on Redis: retention is off only when both are 0.

    ``maxlen`` bounds a topic, so on Redis Cluster each of its ``partitions``
    streams keeps an even share of it (rounded up): the sizing arithmetic of
    a single Redis then holds for the whole cluster.
    """
    maxlen = DEFAULT_MAXLEN if options.maxlen is None else options.maxlen
    return -(-maxlen // partitions), round(options.retention * 1000)


# ARGV: maxlen (0: no bound by length), retention ms (0: no bound by age),
# then per stream: key, private (0/1). Trims from each stream the entries past
# about its newest maxlen (exactly, up to 1,000 past it) and those older than
# the retention, but never one at or
# past the oldest entry that any group still has pending or has not been
# delivered yet (the lowest of the groups' last-delivered ids and oldest
# pending ids). A topic's stream that no group reads yet keeps what the
# bounds allow, for a group still to come; a private stream without its group
# is left alone. Returns entries removed.
TRIM = r"""
local maxlen = tonumber(ARGV[1])
local retention = tonumber(ARGV[2])
local age_bound = nil
if retention > 0 then
  local t = redis.call('TIME')
  age_bound = (tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - retention) .. '-0'
end

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
for i = 3, #ARGV, 2 do
  local key, private = ARGV[i], ARGV[i + 1] == '1'
  local groups = redis.pcall('XINFO', 'GROUPS', key)
  if type(groups) == 'table' and not groups.err and not (private and #groups == 0) then
    -- The newest id that the bounds allow to trim below.
    local bound = nil
    if maxlen > 0 then
      local length = redis.call('XLEN', key)
      local excess = length - maxlen
      if excess > 0 and excess <= 1000 then
        local cut = redis.call('XRANGE', key, '-', '+', 'COUNT', excess + 1)
        bound = cut[#cut][1]
      elseif excess > 0 then
        -- Far past maxlen (a fast stream): reading every entry to the cut
        -- would cost a copy of each into Lua, so the cut is placed by time
        -- between the first and the last entry; a stream whose entries
        -- share one millisecond is cut 1,000 entries at a time.
        local first = split(redis.call('XRANGE', key, '-', '+', 'COUNT', 1)[1][1])
        local last = split(redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)[1][1])
        local at = first + math.floor((last - first) * excess / length)
        if at > first then
          bound = string.format('%d-0', at)
        else
          local cut = redis.call('XRANGE', key, '-', '+', 'COUNT', 1001)
          bound = cut[#cut][1]
        end
      end
    end
    if age_bound and (bound == nil or older(bound, age_bound)) then bound = age_bound end
    if bound then
      for _, flat in ipairs(groups) do
        local g = {}
        for j = 1, #flat, 2 do g[flat[j]] = flat[j + 1] end
        -- Entries up to the last-delivered id were handed out: the next one is
        -- the first this group has not been given.
        local ms, seq = split(g['last-delivered-id'])
        local floor = g['last-delivered-id']
        if seq < 2^53 then floor = string.format('%d-%d', ms, seq + 1) end
        if tonumber(g.pending) > 0 then
          local summary = redis.call('XPENDING', key, g.name)
          if older(summary[2], floor) then floor = summary[2] end
        end
        if older(floor, bound) then bound = floor end
      end
      removed = removed + redis.call('XTRIM', key, 'MINID', bound)
    end
  end
end
return removed
"""
