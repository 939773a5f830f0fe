"""The hand-written encoders, pinned to the general ones they stand in for.

The per-event path writes RESP (``pack_call``) and JSON (event envelopes,
Redis commit headers) by hand for speed. Hypothesis checks, over arbitrary
arguments and a JSON corpus rich in unicode, control characters, quotes,
backslashes, large integers and nesting, that the bytes are exactly what
redis-py's packer and ``json.dumps`` produce, and that they decode back to the
same values.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis import exceptions as rexc
from redis.connection import Encoder, PythonRespSerializer

from brokers.base import TOPIC_PATTERN, Delivery, Message, StateWrite
from brokers.redis_commit import commit_args
from brokers.redis_lines import pack_call
from brokers.wire import dumps, quote, quote_name
from choreo.codec import EVENT_TYPE_PATTERN, MAX_ID_LENGTH, MAX_TYPE_LENGTH, WIRE_VERSION, decode_json
from choreo.errors import DecodeError
from choreo.events import Event, _trusted_event, decode_event, encode_event

_SERIALIZER = PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


# Text over every code point but lone surrogates (which are not UTF-8), with
# the characters JSON escapes made common.
_text = st.text(
    st.one_of(st.sampled_from('"\\/\b\f\n\r\t\x00\x1f\x7f\u2028\u2029\ufeff'), st.characters(exclude_categories=["Cs"]))
)
_big_ints = st.one_of(st.integers(), st.integers(min_value=-(2**200), max_value=2**200))
_json = st.recursive(
    st.one_of(st.none(), st.booleans(), _big_ints, st.floats(allow_nan=False, allow_infinity=False), _text),
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(_text, inner, max_size=5)),
    max_leaves=30,
)
_names = st.from_regex(TOPIC_PATTERN, fullmatch=True)
_arguments = st.lists(
    st.one_of(_text, st.binary(), _big_ints, st.floats(allow_nan=False)), max_size=80
)


@given(_arguments)
def test_pack_call_is_redis_py_packing(args: list[Any]) -> None:
    """A call packed by hand is the argument count and arguments as redis-py packs them."""
    count, packed = pack_call(args)
    expected = b"".join(_SERIALIZER.pack("EVALSHA", len(args), *args))
    assert count == len(args) + 1
    assert b"*%d\r\n$7\r\nEVALSHA\r\n" % (count + 1) + packed == expected


@pytest.mark.parametrize("bad", [True, None, object()])
def test_pack_call_refuses_what_redis_py_refuses(bad: object) -> None:
    with pytest.raises(rexc.DataError):
        _SERIALIZER.pack("EVALSHA", bad)
    with pytest.raises(rexc.DataError):
        pack_call([b"x", bad])


@given(_json)
def test_dumps_is_json_dumps(value: Any) -> None:
    assert dumps(value) == _dumps(value)
    assert json.loads(dumps(value)) == value


@given(_text)
def test_quoted_strings_are_json_dumps(text: str) -> None:
    assert quote(text) == quote_name(text) == _dumps(text)
    assert json.loads(quote(text)) == text


_times = st.datetimes(
    min_value=datetime(1, 1, 2),
    max_value=datetime(9999, 12, 30),
    timezones=st.one_of(
        st.just(UTC), st.integers(-23 * 60, 23 * 60).map(lambda minutes: timezone(timedelta(minutes=minutes)))
    ),
)
# Ids from other producers are length-checked on decode but may hold any
# character, and a retry or a child event writes them again: the writer must
# quote any text. ``_trusted_event`` builds such events as decoding does.
_ids = _text.filter(lambda text: 0 < len(text) <= MAX_ID_LENGTH)


def _decoded_event(
    type: str,
    data: dict[str, Any],
    id: str,
    correlation_id: str,
    causation_id: str | None,
    saga_id: str | None,
    occurred_at: datetime,
    attempt: int,
    headers: dict[str, str],
) -> Event:
    return _trusted_event(type, data, id, correlation_id or id, causation_id, saga_id, occurred_at, attempt, headers)


_events = st.builds(
    _decoded_event,
    type=st.from_regex(EVENT_TYPE_PATTERN, fullmatch=True).filter(lambda name: len(name) <= MAX_TYPE_LENGTH),
    data=st.dictionaries(_text, _json, max_size=6),
    id=_ids,
    correlation_id=st.just("") | _ids,
    causation_id=st.none() | _ids,
    saga_id=st.none() | _ids,
    occurred_at=_times,
    attempt=st.integers(min_value=1, max_value=2**100),
    headers=st.dictionaries(_text, _text, max_size=4),
)


@given(_events)
def test_event_envelope_is_json_dumps_and_round_trips(event: Event) -> None:
    """The envelope written around the encoded data is the JSON object
    ``json.dumps`` writes, field for field and byte for byte."""
    envelope = {
        "v": WIRE_VERSION,
        "type": event.type,
        "id": event.id,
        "data": event.data,
        "correlation_id": event.correlation_id,
        "causation_id": event.causation_id,
        "saga_id": event.saga_id,
        "occurred_at": event.occurred_at.isoformat(),
        "attempt": event.attempt,
        "headers": event.headers,
    }
    body = encode_event(event, max_size=1 << 30)
    assert body == _dumps(envelope).encode()
    assert json.loads(body) == envelope
    assert decode_event(body, max_size=1 << 30, max_depth=1000) == event


_deliveries = st.builds(
    Delivery,
    topic=_text,
    group=_text,
    consumer=_text,
    entry_id=st.from_regex(r"\A[0-9]{1,15}-[0-9]{1,6}\Z"),
    message_id=st.none() | _text,
    body=st.binary(),
    deliveries=st.integers(min_value=1, max_value=2**40),
    duplicate=st.booleans(),
)
_messages = st.builds(
    Message,
    topic=_names,
    id=_text,
    body=st.binary(),
    delay=st.none() | st.floats(min_value=-10, max_value=1e6),
    group=st.none() | _names,
)
_writes = st.builds(
    StateWrite, key=_text, value=st.none() | st.binary(), expected_version=st.integers(min_value=0, max_value=2**62)
)


@given(
    delivery=st.none() | st.tuples(_deliveries, _text),
    dead_letter=st.none() | _text,
    state=st.lists(_writes, max_size=4),
    messages=st.lists(_messages, max_size=4),
    done=st.booleans(),
    dedupe_ms=st.integers(min_value=1, max_value=2**45),
)
def test_commit_header_reads_back_as_its_fields(
    delivery: tuple[Delivery, str] | None,
    dead_letter: str | None,
    state: list[StateWrite],
    messages: list[Message],
    done: bool,
    dedupe_ms: int,
) -> None:
    """The binary commit header written out for COMMIT_BATCH reads back, field
    by field as the script's ``struct.unpack`` formats read it, as the same values."""
    located = None if delivery is None else (delivery[1], delivery[0].entry_id)
    if delivery is not None:
        held, key = delivery
        flags = 1 | 2 * (held.message_id is not None) | 4 * done | 8 * (dead_letter is not None) | 16 * held.duplicate
        settle: list[Any] = [flags, key, held.group, held.consumer, held.entry_id, held.deliveries,
                             held.message_id or "", dedupe_ms, dead_letter or "", held.topic]
    else:
        settle = [0, "", "", "", "", 0, "", 0, "", ""]
    blobs, _ = commit_args(
        None if delivery is None else delivery[0], located, dead_letter, state, messages, done, dedupe_ms
    )
    reader = _HeaderReader(blobs[0])
    assert [reader.byte(), *(reader.text() for _ in range(4)), reader.i64(), reader.text(), reader.i64(),
            reader.text(), reader.text()] == settle
    assert (reader.u32(), reader.u32()) == (len(state), len(messages))
    for write in state:
        assert (reader.text(), reader.byte(), reader.i64()) == (
            write.key, write.value is not None, write.expected_version)
    for m in messages:
        assert (reader.text(), reader.text(), reader.text(), reader.i64()) == (
            m.topic, m.group or "", m.id, max(0, round(m.delay * 1000)) if m.delay else 0)
    assert reader.at == len(blobs[0])


class _HeaderReader:
    """Reads a commit header the way COMMIT_BATCH's ``struct`` formats do."""

    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def _take(self, size: int) -> bytes:
        chunk = self.data[self.at:self.at + size]
        assert len(chunk) == size
        self.at += size
        return chunk

    def byte(self) -> int:
        return self._take(1)[0]

    def u32(self) -> int:
        return int.from_bytes(self._take(4), "big")

    def i64(self) -> int:
        return int.from_bytes(self._take(8), "big", signed=True)

    def text(self) -> str:
        return self._take(self.u32()).decode()


@pytest.mark.parametrize("raw", [b'{"a":1,"a":2}', b'{"a":{"b:":1,"b:":1}}', b'{"a:b":1,"a:b":2,"c":":"}'])
def test_duplicate_keys_are_refused_wherever_they_are(raw: bytes) -> None:
    with pytest.raises(DecodeError, match="duplicate key"):
        decode_json(raw)
