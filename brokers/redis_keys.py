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
``<p>:_seen:<group>:#<n>``          hash        dedupe records of a group, bucket ``n``:
                                               one field per settled message id
``<p>:_seen:<group>:#``             hash        the group's current bucket ``{n, at}``
``<p>:_state:<key>``               hash        versioned state ``{v: value, n: version}``
``<p>:_state_keys``                sorted set  index of the state keys (lex range)
=================================  ==========  ==========================================
"""

from __future__ import annotations

import re
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
    """

    prefix: str = "choreo"

    # -- one method per kind of key ---------------------------------------------

    def stream(self, topic: str) -> str:
        """The stream of a topic."""
        return f"{self.prefix}:{topic}"

    def private_stream(self, group: str, topic: str) -> str:
        """The stream of the messages sent to one group of a topic (retries, replays)."""
        return f"{self.prefix}:_group:{group}:{topic}"

    def delayed(self) -> str:
        """The sorted set of delayed messages."""
        return f"{self.prefix}:_delayed"

    def dead_letters(self) -> str:
        """The dead-letter stream."""
        return f"{self.prefix}:_dead"

    def seen(self, group: str, bucket: str) -> str:
        """One bucket of the dedupe records of a group (a hash keyed by
        message id); ``bucket`` is its number, as decimal text."""
        return f"{self.prefix}:_seen:{group}:#{bucket}"

    def seen_head(self, group: str) -> str:
        """The hash naming a group's current dedupe bucket and when it began."""
        return f"{self.prefix}:_seen:{group}:#"

    def state(self, key: str) -> str:
        """The hash holding one state key's value and version."""
        return f"{self.prefix}:_state:{key}"

    def state_index(self) -> str:
        """The sorted set indexing the state keys."""
        return f"{self.prefix}:_state_keys"

    # -- derived from the methods above -------------------------------------------

    def pattern(self) -> str:
        """A SCAN ``MATCH`` pattern covering every key of this layout."""
        return _glob_escape(self.prefix) + ":*"

    def parse_stream(self, key: str) -> tuple[str, str | None] | None:
        """The topic and group (``None`` for a topic's own stream) of a stream
        key, or ``None`` if ``key`` is not a topic's or a group's stream."""
        # A group name may contain ':', a topic too: the first ':' after the
        # group ends it, as it always has on the wire.
        match = _matcher(self.private_stream(_HOLE, _HOLE), "([^:]+)", "(.+)").fullmatch(key)
        if match is not None:
            group, topic = match.groups()
            if TOPIC_PATTERN.fullmatch(group) and TOPIC_PATTERN.fullmatch(topic):
                return topic, group
            return None
        match = _matcher(self.stream(_HOLE), "(.+)").fullmatch(key)
        if match is not None and TOPIC_PATTERN.fullmatch(match.group(1)):
            return match.group(1), None
        return None

    def lua(self) -> str:
        """Lua functions naming the same keys, for the scripts' sources.

        ``stream_key(topic, group)`` (the topic's stream when ``group`` is
        ``''``), ``seen_key(group, bucket)``, ``seen_head_key(group)``,
        ``state_key(key)``, ``delayed_key()``, ``dead_key()`` and
        ``state_index_key()``. Each is rendered from the
        method of the same kind, so the two cannot disagree.
        """
        return "\n".join((
            "local function stream_key(topic, group)",
            f"  if group == nil or group == '' then return {_lua_concat(self.stream, 'topic')} end",
            f"  return {_lua_concat(self.private_stream, 'group', 'topic')}",
            "end",
            _lua_function("seen_key", self.seen, "group", "bucket"),
            _lua_function("seen_head_key", self.seen_head, "group"),
            _lua_function("state_key", self.state, "key"),
            _lua_function("delayed_key", self.delayed),
            _lua_function("dead_key", self.dead_letters),
            _lua_function("state_index_key", self.state_index),
            "",
        ))


def _lua_function(name: str, method: Callable[..., str], *params: str) -> str:
    return f"local function {name}({', '.join(params)}) return {_lua_concat(method, *params)} end"


def _lua_concat(method: Callable[..., str], *params: str) -> str:
    """``method`` as a Lua expression: its literal parts quoted, its arguments
    replaced by the Lua variables ``params``, in order."""
    pieces = method(*[_HOLE] * len(params)).split(_HOLE)
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
