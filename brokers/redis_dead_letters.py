"""The dead letters of the Redis Streams adapter (the ``Inspection`` role's
``dead_letters``, ``replay`` and ``purge_dead_letters``), mixed into
``RedisStreamsBroker``, with the script that replays one. On Redis Cluster
each partition has its dead-letter stream; the ids handed out carry their
partition.
"""

from __future__ import annotations

from collections.abc import Sequence

from redis import exceptions as rexc

from brokers.base import BrokerError, DeadLetterRecord
from brokers.redis_admin import _Host
from brokers.redis_scripts import COMMON
from brokers.redis_support import dead_letter_record, is_stream_id, tag_entry, text, untag_entry

__all__ = ("REPLAY", "RedisDeadLetters")


class RedisDeadLetters:
    """Dead letters of ``RedisStreamsBroker``."""

    async def dead_letters(self: _Host, limit: int = 1000) -> list[DeadLetterRecord]:
        """The dead-letter stream, oldest first."""
        try:
            pipe = self._redis().pipeline(transaction=False)
            for p in range(self.keys.count):
                pipe.xrange(self.keys.dead_letters(p), count=max(1, limit))
            pages = await pipe.execute()
        except rexc.RedisError as exc:
            raise BrokerError(f"dead_letters failed on {self.url}: {exc}") from exc
        found = [(_order(entry_id), tag_entry(self.clustered, p, text(entry_id)), fields)
                 for p, page in enumerate(pages) for entry_id, fields in page]
        return [dead_letter_record(tagged, fields) for _, tagged, fields in sorted(found)[: max(1, limit)]]

    async def replay(self: _Host, dead_letter_id: str) -> bool:
        """Republish a dead letter and forget its dedupe record (one script)."""
        located = _dead_letter_id(self, dead_letter_id)
        if located is None:
            return False
        replayed = await self._run("REPLAY", [located[1]], located[0])
        if replayed == -1:
            raise BrokerError(
                f"dead letter {dead_letter_id} keeps only a prefix of an oversized entry: it cannot be replayed"
            )
        return bool(replayed)

    async def purge_dead_letters(self: _Host, ids: Sequence[str] | None = None) -> int:
        """Delete the given dead letters (all if ``None``); return how many."""
        try:
            if ids is None:
                removed = 0
                for p in range(self.keys.count):
                    pipe = self._redis().pipeline(transaction=True)
                    pipe.xlen(self.keys.dead_letters(p))
                    pipe.delete(self.keys.dead_letters(p))
                    removed += int((await pipe.execute())[0])
                return removed
            by_partition: dict[int, list[str]] = {}
            for located in filter(None, (_dead_letter_id(self, i) for i in ids)):
                by_partition.setdefault(located[0], []).append(located[1])
            return sum([int(await self._redis().xdel(self.keys.dead_letters(p), *valid))
                        for p, valid in by_partition.items()])
        except rexc.RedisError as exc:
            raise BrokerError(f"purge_dead_letters failed on {self.url}: {exc}") from exc


def _dead_letter_id(host: _Host, dead_letter_id: str) -> tuple[int, str] | None:
    """The partition and stream id of a dead letter's id, or ``None`` if it is none."""
    try:
        partition, entry = untag_entry(host.clustered, dead_letter_id)
    except ValueError:
        return None
    return (partition, entry) if partition < host.keys.count and is_stream_id(entry) else None


def _order(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = text(entry_id).partition("-")
    return int(ms), int(seq)


# ARGV: dead letter id. Returns 1, or 0 if there is no such letter.
REPLAY = COMMON + r"""
local id = ARGV[1]
local dkey = dead_key()
local found = redis.call('XRANGE', dkey, id, id)
if #found == 0 then return 0 end
local f = {}
local flat = found[1][2]
for i = 1, #flat, 2 do f[flat[i]] = flat[i + 1] end
if f.size then return -1 end  -- only a prefix of an oversized entry was kept
local group = f.group or ''
local fields = {'body', f.body or ''}
if f.message_id then
  fields[3] = 'id'
  fields[4] = f.message_id
  if group ~= '' then
    local n = tonumber(redis.call('HGET', seen_head_key(group), 'n'))
    if n ~= nil then
      redis.call('HDEL', seen_key(group, tostring(n)), f.message_id)
      redis.call('HDEL', seen_key(group, tostring(n - 1)), f.message_id)
    end
  end
end
redis.call('XADD', stream_key(f.topic or '', group), '*', unpack(fields))
redis.call('XDEL', dkey, id)
return 1
"""

