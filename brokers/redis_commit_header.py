"""The arguments of one commit of the Redis Streams adapter's commit script
(``brokers.redis_commit.COMMIT_BATCH``): a binary header with every name,
id and number, then the bodies and values as arguments of their own."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from brokers.base import BrokerError, Delivery, Message, StateWrite, check_name
from brokers.speedups import remember

__all__ = ("commit_args",)

# The layout, as ``commit`` in the script sees its ``ARGV``:
# ARGV[1]: a binary header, big-endian, each string as a 4-byte length and
#   its UTF-8 bytes (``struct`` format ``I4c0``):
#   flags (1 byte: 1 settles a delivery, 2 has a message id, 4 done, 8 dead
#     letter, 16 handed out marked duplicate), stream key, group, consumer,
#     entry id, deliveries (8 bytes), message id, dedupe ttl ms (8 bytes),
#     dead reason, topic (without a delivery to settle: all empty or 0);
#   the number of writes and of messages (4 bytes each);
#   each write: state key, has value (1 byte), expected version (8 bytes);
#   each message: topic, group, id, delay ms (8 bytes).
# ARGV[2...]: the bytes, in order: the dead letter's body (only with a dead
# letter), each write's value, each message's body.


def commit_args(
    delivery: Delivery | None,
    located: tuple[str, str] | None,
    dead_letter: str | None,
    state: Sequence[StateWrite],
    messages: Sequence[Message],
    done: bool,
    dedupe_ms: int,
) -> tuple[list[Any], float | None]:
    """One commit's arguments for COMMIT_BATCH (see the layout above) and
    the soonest delay of its messages, in seconds. ``dedupe_ms``: how long
    the dedupe record is kept, in milliseconds (at least 1).

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
                _I64.pack(int(delivery.deliveries)), _text(mid or ""), _I64.pack(dedupe_ms),
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
    except struct.error as exc:
        raise BrokerError(f"a count or version of this commit is out of range: {exc}") from None
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
_NO_SETTLE = b"".join([_BYTE[0], _text(""), _text(""), _text(""), _text(""), _I64.pack(0), _text(""),
                       _I64.pack(0), _text(""), _text("")])
