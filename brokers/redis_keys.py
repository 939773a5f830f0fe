"""The Redis key layout of the Redis Streams adapter, in one place.

Every key the adapter reads or writes is named by one method of ``Keys``, one
method per kind of key; the Python side calls them and the Lua scripts call
functions rendered from them when the broker connects (``Keys.lua``), so the
layout is written down once. A partition's hash tag for Redis Cluster belongs
inside these methods and nowhere else.

The layout (``<p>`` is the prefix, default ``choreo``; topics and groups
match ``TOPIC_PATTERN``, so they never start with ``_`` and cannot collide
with the reserved names):

=================================  ==========  ==========================================
``<p>:<topic>``                    stream      the topic's entries (fields ``id``, ``body``)
``<p>:_group:<group>:<topic>``     stream      the group's private entries for the topic
``<p>:_delayed``                   sorted set  delayed messages, scored by due time (ms)
``<p>:_dead``                      stream      dead letters
``<p>:_seen:<group>:#<n>``         hash        dedupe records of a group, bucket ``n``:
                                               one field per settled message id
``<p>:_seen:<group>:#``            hash        the group's current bucket ``{n, at}``
``<p>:_state:<key>``               hash        versioned state ``{v: value, n: version}``
``<p>:_state_keys``                sorted set  index of the state keys (lex range)
=================================  ==========  ==========================================

On Redis Cluster (``Keys.partitions`` set) every name above starts with
``<p>:{<n>}`` instead of ``<p>``, ``<n>`` being one of the partitions: the
hash tag ``{<n>}`` puts all of a partition's keys in one slot, so a script
may touch any of them. One key stays outside the partitions:
``<p>:_partitions``, the partition count the cluster was set up with.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable

import attrs

from brokers.base import TOPIC_PATTERN

__all__ = ("Keys",)

#: Stands in for an argument while a key method is rendered as a template.
_HOLE = "\x00"
#: Bytes written as themselves in a Lua string literal; everything else is escaped.
_LUA_PLAIN = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-:{}")


@attrs.frozen
class Keys:
    """The names of every Redis key under one prefix (see the module doc).

    Args:
        prefix: The key prefix (``BrokerOptions.prefix``).
        partitions: ``None`` for the single layout of one Redis server (no
            hash tags: the names in the table); a count for Redis Cluster:
            every key then lives in one of that many partitions, each a hash
            tag of its own, ``<p>:{<n>}:`` in front of the name.
    """

    prefix: str = "choreo"
    partitions: int | None = None

    def __attrs_post_init__(self) -> None:
        if self.partitions is not None and ("{" in self.prefix or "}" in self.prefix):
            raise ValueError(f"prefix {self.prefix!r} cannot hold '{{' or '}}' on Redis Cluster: they make hash tags")

    # -- partitions ------------------------------------------------------------------

    @property
    def count(self) -> int:
        """How many partitions the layout has (1 for the single layout)."""
        return self.partitions or 1

    def root(self, partition: int = 0) -> str:
        """What every key of ``partition`` starts with: the prefix, then (on
        Redis Cluster) the partition's hash tag."""
        if self.partitions is None:
            return self.prefix
        return f"{self.prefix}:{{{partition}}}"

    def partition_of(self, key: str) -> int:
        """The partition of a partition key (a correlation id, a message id,
        a state key): stable across processes and releases."""
        if self.partitions is None:
            return 0
        return zlib.crc32(key.encode()) % self.partitions

    def route(self, partition: int) -> list[str]:
        """The keys a script declares to run in ``partition`` (none on the
        single layout): the partition's root, which the scripts' key
        functions start from, and a guard key. Neither ever exists, so while
        the partition's slot migrates Redis answers TRYAGAIN instead of
        running a script with its keys split between two nodes."""
        if self.partitions is None:
            return []
        root = self.root(partition)
        return [root, root + ":_guard"]

    def meta(self) -> str:
        """The string holding the partition count a Redis Cluster was set up with."""
        return f"{self.prefix}:_partitions"

    # -- one method per kind of key ---------------------------------------------

    def stream(self, topic: str, partition: int = 0) -> str:
        """The stream of a topic."""
        return _stream(self.root(partition), topic)

    def private_stream(self, group: str, topic: str, partition: int = 0) -> str:
        """The stream of the messages sent to one group of a topic (retries, replays)."""
        return _private_stream(self.root(partition), group, topic)

    def delayed(self, partition: int = 0) -> str:
        """The sorted set of delayed messages."""
        return _delayed(self.root(partition))

    def dead_letters(self, partition: int = 0) -> str:
        """The dead-letter stream."""
        return _dead_letters(self.root(partition))

    def seen(self, group: str, bucket: str, partition: int = 0) -> str:
        """One bucket of the dedupe records of a group (a hash keyed by
        message id); ``bucket`` is its number, as decimal text."""
        return _seen(self.root(partition), group, bucket)

    def seen_head(self, group: str, partition: int = 0) -> str:
        """The hash naming a group's current dedupe bucket and when it began."""
        return _seen_head(self.root(partition), group)

    def state(self, key: str, partition: int = 0) -> str:
        """The hash holding one state key's value and version."""
        return _state(self.root(partition), key)

    def state_index(self, partition: int = 0) -> str:
        """The sorted set indexing the state keys."""
        return _state_index(self.root(partition))

    # -- derived from the methods above -------------------------------------------

    def pattern(self) -> str:
        """A SCAN ``MATCH`` pattern covering every key of this layout."""
        return _glob_escape(self.prefix) + ":*"

    def parse_stream(self, key: str) -> tuple[str, str | None] | None:
        """The topic and group (``None`` for a topic's own stream) of a stream
        key, or ``None`` if ``key`` is not a topic's or a group's stream."""
        found = self.locate_stream(key)
        return None if found is None else found[:2]

    def locate_stream(self, key: str) -> tuple[str, str | None, int] | None:
        """``parse_stream``, with the stream's partition."""
        root, partition = self.prefix, 0
        if self.partitions is not None:
            tagged = re.fullmatch(re.escape(self.prefix) + r":\{(\d+)\}(:.*)", key, re.DOTALL)
            if tagged is None or int(tagged.group(1)) >= self.partitions:
                return None
            partition = int(tagged.group(1))
            root = self.root(partition)
        # A group name may contain ':', a topic too: the first ':' after the
        # group ends it, as it always has on the wire.
        match = _matcher(_private_stream(root, _HOLE, _HOLE), "([^:]+)", "(.+)").fullmatch(key)
        if match is not None:
            group, topic = match.groups()
            if TOPIC_PATTERN.fullmatch(group) and TOPIC_PATTERN.fullmatch(topic):
                return topic, group, partition
            return None
        match = _matcher(_stream(root, _HOLE), "(.+)").fullmatch(key)
        if match is not None and TOPIC_PATTERN.fullmatch(match.group(1)):
            return match.group(1), None, partition
        return None

    def lua(self) -> str:
        """Lua functions naming the same keys, for the scripts' sources.

        ``stream_key(topic, group)`` (the topic's stream when ``group`` is
        ``''``), ``seen_key(group, bucket)``, ``seen_head_key(group)``,
        ``state_key(key)``, ``delayed_key()``, ``dead_key()`` and
        ``state_index_key()``. Each is rendered from the function of the same
        kind, so the two cannot disagree. On Redis Cluster they name the keys
        of the partition the script was called in (its first declared key is
        the partition's root, see ``route``).
        """
        if self.partitions is None:
            head, root = [], self.prefix
        else:
            head, root = ["local root = KEYS[1]"], _HOLE

        def at(name: Callable[..., str]) -> Callable[..., str]:
            return lambda *args: name(root, *args)

        return "\n".join((
            *head,
            "local function stream_key(topic, group)",
            f"  if group == nil or group == '' then return {_lua_concat(at(_stream), 'topic')} end",
            f"  return {_lua_concat(at(_private_stream), 'group', 'topic')}",
            "end",
            _lua_function("seen_key", at(_seen), "group", "bucket"),
            _lua_function("seen_head_key", at(_seen_head), "group"),
            _lua_function("state_key", at(_state), "key"),
            _lua_function("delayed_key", at(_delayed)),
            _lua_function("dead_key", at(_dead_letters)),
            _lua_function("state_index_key", at(_state_index)),
            "",
        ))


# One function per kind of key, from the root of its partition: the methods
# above and the Lua functions are both made from these.


def _stream(root: str, topic: str) -> str:
    return f"{root}:{topic}"


def _private_stream(root: str, group: str, topic: str) -> str:
    return f"{root}:_group:{group}:{topic}"


def _delayed(root: str) -> str:
    return f"{root}:_delayed"


def _dead_letters(root: str) -> str:
    return f"{root}:_dead"


def _seen(root: str, group: str, bucket: str) -> str:
    return f"{root}:_seen:{group}:#{bucket}"


def _seen_head(root: str, group: str) -> str:
    return f"{root}:_seen:{group}:#"


def _state(root: str, key: str) -> str:
    return f"{root}:_state:{key}"


def _state_index(root: str) -> str:
    return f"{root}:_state_keys"


def _lua_function(name: str, method: Callable[..., str], *params: str) -> str:
    return f"local function {name}({', '.join(params)}) return {_lua_concat(method, *params)} end"


def _lua_concat(method: Callable[..., str], *params: str) -> str:
    """``method`` as a Lua expression: its literal parts quoted, its arguments
    replaced by the Lua variables ``params``, in order."""
    pieces = method(*[_HOLE] * len(params)).split(_HOLE)
    if len(pieces) == len(params) + 2:  # the root is a hole too: the Lua variable ``root``
        params = ("root", *params)
    out = [_lua_string(pieces[0])] if pieces[0] else []
    for param, literal in zip(params, pieces[1:], strict=True):
        out.append(param)
        if literal:
            out.append(_lua_string(literal))
    return " .. ".join(out) or "''"


def _lua_string(text: str) -> str:
    """A Lua string literal of ``text`` (UTF-8); any prefix is safe in it."""
    return "'" + "".join(chr(b) if b in _LUA_PLAIN else f"\\{b:03d}" for b in text.encode()) + "'"


def _matcher(template: str, *groups: str) -> re.Pattern[str]:
    pieces = template.split(_HOLE)
    pattern = re.escape(pieces[0])
    for group, literal in zip(groups, pieces[1:], strict=True):
        pattern += group + re.escape(literal)
    return re.compile(pattern)


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)
