"""The JSON wire format of events.

On the wire an event is one JSON object (never pickle): an envelope of its
ids, type, time and attempt around its data. Bodies are size-capped before
parsing, parsed with duplicate keys refused and nesting bounded, and every
envelope field is validated before an event is built. The envelope's
timestamps are made here too, and event ids in ``choreo.ids``.

The envelope is written out around the C encoder's output instead of built as
a dict and encoded (see ``encode_event``); ``tests/test_codec_properties.py``
pins it to what ``json.dumps`` writes.

Policy (RELIABILITY rule 10): duplicate keys, ``NaN`` and ``Infinity``,
numbers out of the float range (``1e400``), ints over Python's 4300-digit
limit and nesting deeper than ``max_depth`` are refused, each with its
reason; encoding refuses NaN, infinities, sets and other non-JSON values.

Why not msgspec (measured with msgspec 0.23 on this format): its decoder
refuses NaN, Infinity, ``1e400`` and ints past Python's digit limit like
this one, stops deep nesting at its own limit (RecursionError near 1000
levels, so the depth check stays), but keeps the last of duplicate keys
without a word (msgspec issue 648, open), also into a ``Struct``; its
encoder writes NaN and infinities as ``null`` and sets as arrays. Keeping
the rules means checking its output in Python: counting that the parsed
value's pairs and the colons in its strings match the body's colons finds
every dropped duplicate, but on a 335-byte event body that check and
msgspec took 52,000 instructions (callgrind) against 46,500 for the
stdlib scanner with the duplicate-key hook used here (msgspec alone:
12,100). The wrapper costs more than it saves, so there is no msgspec
path and no new dependency.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from brokers.speedups import remember
from brokers.wire import dumps as _json
from brokers.wire import quote as _quote
from choreo.errors import DecodeError
from choreo.ids import new_event_id

__all__ = (
    "DEFAULT_MAX_DEPTH",
    "DEFAULT_MAX_SIZE",
    "EVENT_TYPE_PATTERN",
    "ID_PATTERN",
    "MAX_ID_LENGTH",
    "MAX_TYPE_LENGTH",
    "WIRE_VERSION",
    "BuildEvent",
    "DecodeEvent",
    "WireEvent",
    "decode_json",
    "encode_event",
    "event_decoder",
    "new_event_id",
    "utcnow",
    "validate_event_type",
    "validate_id",
)

E = TypeVar("E")
E_co = TypeVar("E_co", covariant=True)

#: Dotted names of letters, digits, ``_`` and ``-``, starting with a letter or
#: digit: ``order.created``, ``saga.cmd.payment_service.charge_card``. They
#: become stream keys, so nothing else is allowed (a leading ``_`` is the
#: brokers' own: ``_dead`` is the dead-letter stream).
EVENT_TYPE_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*(\.[A-Za-z0-9_\-]+)*$")
MAX_TYPE_LENGTH = 200
#: Event, correlation, causation and saga ids: 1 to 128 letters, digits and
#: ``._:-`` (a ULID, a UUID, ``order-42``...). They become dedupe keys and log
#: fields, so they are short and plain; an empty id would dedupe nothing.
ID_PATTERN = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
MAX_ID_LENGTH = 128
DEFAULT_MAX_SIZE = 1024 * 1024
DEFAULT_MAX_DEPTH = 32
WIRE_VERSION = 1

# Names already validated: a system has few event types and meets each one
# for every event, so the regex runs once per name (``remember``).
_valid_types: dict[str, str] = {}


def validate_event_type(event_type: object) -> str:
    """Return ``event_type`` if it is a valid event type name.

    Raises:
        DecodeError: it is not a string matching ``EVENT_TYPE_PATTERN``.
    """
    if not isinstance(event_type, str):
        raise DecodeError(f"invalid event type {repr(event_type)[:80]}: it must be a string")
    if event_type in _valid_types:
        return event_type
    if len(event_type) > MAX_TYPE_LENGTH or not EVENT_TYPE_PATTERN.fullmatch(event_type):
        shown = repr(event_type)[:80]
        raise DecodeError(
            f"invalid event type {shown}: use dotted names of letters, digits, '_' and '-', "
            "starting with a letter or digit"
        )
    return remember(_valid_types, event_type, event_type)


def validate_id(field: str, value: object) -> str:
    """Return ``value`` if it is a valid id for ``field`` (``ID_PATTERN``).

    Ids are checked where events are made (``Event(...)``, ``publish``);
    decoding checks only their length, the cheap half, on every delivery.

    Raises:
        DecodeError: not a string of 1 to 128 letters, digits or ``._:-``.
    """
    if isinstance(value, str) and ID_PATTERN.fullmatch(value):
        return value
    shown = repr(value)[:80] + ("..." if len(repr(value)) > 80 else "")
    raise DecodeError(f"invalid {field} {shown}: use 1 to {MAX_ID_LENGTH} letters, digits or '._:-'")


def utcnow() -> datetime:
    """Now, in UTC: an event's ``occurred_at`` when it has none."""
    return datetime.now(UTC)


class WireEvent(Protocol):
    """What ``encode_event`` reads of an event (``choreo.events.Event``)."""

    @property
    def type(self) -> str: ...
    @property
    def data(self) -> dict[str, Any]: ...
    @property
    def id(self) -> str: ...
    @property
    def correlation_id(self) -> str: ...
    @property
    def causation_id(self) -> str | None: ...
    @property
    def saga_id(self) -> str | None: ...
    @property
    def occurred_at(self) -> datetime: ...
    @property
    def attempt(self) -> int: ...
    @property
    def headers(self) -> dict[str, str]: ...


class BuildEvent(Protocol[E_co]):
    """Makes an event from validated fields, in ``Event``'s field order."""

    def __call__(
        self,
        event_type: str,
        data: dict[str, Any],
        event_id: str,
        correlation_id: str,
        causation_id: str | None,
        saga_id: str | None,
        occurred_at: datetime,
        attempt: int,
        headers: dict[str, str],
        /,
    ) -> E_co: ...


class DecodeEvent(Protocol[E_co]):
    """``decode_event``'s signature (see ``event_decoder``)."""

    def __call__(self, raw: bytes, *, max_size: int = ..., max_depth: int = ...) -> E_co: ...


def encode_event(event: WireEvent, *, max_size: int = DEFAULT_MAX_SIZE) -> bytes:
    """Serialize an event to its JSON wire form.

    Raises:
        DecodeError: the data is not JSON (NaN, Infinity, sets, objects...) or
            the result exceeds ``max_size`` bytes.
    """
    # The envelope is put together around the encoded data: its fields are a
    # validated type name, strings, a time and an int, and building a dict
    # for the encoder to take apart again costs more than the JSON itself.
    event_type = event.type
    if event_type not in _valid_types:
        validate_event_type(event_type)
    attempt = event.attempt
    try:
        body = (
            f'{{"v":{WIRE_VERSION},"type":"{event_type}","id":{_quote(event.id)},"data":{_json(event.data)},'
            f'"correlation_id":{_quote(event.correlation_id)},"causation_id":{_optional(event.causation_id)},'
            f'"saga_id":{_optional(event.saga_id)},"occurred_at":"{_isoformat(event.occurred_at)}",'
            f'"attempt":{attempt if type(attempt) is int else _json(attempt)},'
            f'"headers":{_json(event.headers) if event.headers else "{}"}}}'
        ).encode()
    except (TypeError, ValueError, RecursionError) as exc:  # UnicodeEncodeError (lone surrogates) included
        raise DecodeError(f"event {event.type!r} data is not valid JSON: {exc}") from None
    if len(body) > max_size:
        raise DecodeError(f"event {event.type!r} is {len(body)} bytes, over the {max_size}-byte limit")
    return body


# (second, minute, hour, day, month, year) and its "YYYY-MM-DDTHH:MM:SS", as one
# tuple so that threads encoding at once never pair a key with another's text.
_iso_second: tuple[tuple[int, ...], str] = ((), "")


def _isoformat(moment: datetime) -> str:
    """``moment.isoformat()``; for UTC times (all of choreo's own) the part
    up to the second is kept from the last call, as most events of a second
    share it: half the cost of ``isoformat`` on the encode path."""
    global _iso_second
    if moment.tzinfo is not UTC:
        return moment.isoformat()
    key = (moment.second, moment.minute, moment.hour, moment.day, moment.month, moment.year)
    cached_key, text = _iso_second
    if key != cached_key:
        text = moment.replace(microsecond=0, tzinfo=None).isoformat()
        _iso_second = (key, text)
    micro = moment.microsecond
    return f"{text}.{micro:06d}+00:00" if micro else f"{text}+00:00"


def _optional(value: str | None) -> str:
    return "null" if value is None else _quote(value)


def _reject_constant(name: str) -> float:
    raise DecodeError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    # Called by the scanner for numbers with a fraction or exponent only (ints
    # stay on its C path): ``1e400`` would otherwise become infinity, which
    # JSON cannot express and the encoder refuses to write back.
    value = float(text)
    if math.isinf(value):
        raise DecodeError(f"number {text[:40]} is out of range")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DecodeError(f"duplicate key {key[:80]!r} in JSON object")
            seen.add(key)
    return result


# Built once: json.loads with options builds a new decoder on every call.
_DECODER = json.JSONDecoder(
    object_pairs_hook=_unique_keys, parse_constant=_reject_constant, parse_float=_finite_float
)
_scan: Callable[[str, int], tuple[Any, int]] = _DECODER.scan_once  # type: ignore[attr-defined]


def _check_depth(value: Any, limit: int) -> None:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            raise DecodeError(f"JSON nesting deeper than {limit} levels")
        if isinstance(item, dict):
            stack.extend((child, depth + 1) for child in item.values() if isinstance(child, dict | list))
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item if isinstance(child, dict | list))


def _loads(raw: bytes, max_size: int, max_depth: int) -> Any:
    if len(raw) > max_size:
        raise DecodeError(f"message is {len(raw)} bytes, over the {max_size}-byte limit")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"message is not UTF-8: {exc.reason} at byte {exc.start}") from None
    try:
        # The scanner straight away; JSONDecoder.decode adds two regex matches
        # for surrounding whitespace and is left to bodies that have any (and
        # to malformed ones, for its error message).
        try:
            value, end = _scan(text, 0)
        except StopIteration:
            end = -1
        if end != len(text):
            value = _DECODER.decode(text)
    except RecursionError:
        raise DecodeError(f"JSON nesting deeper than {max_depth} levels") from None
    except DecodeError:
        raise
    except ValueError as exc:  # JSONDecodeError, and ints over Python's digit limit
        raise DecodeError(f"malformed JSON: {exc}") from None
    # Only a body with more brackets than the limit can be too deep: count them in C first.
    if raw.count(b"[") + raw.count(b"{") > max_depth:
        _check_depth(value, max_depth)
    return value


def decode_json(raw: bytes, *, max_size: int = DEFAULT_MAX_SIZE, max_depth: int = DEFAULT_MAX_DEPTH) -> Any:
    """Parse JSON by the wire format's rules: size-capped before parsing,
    UTF-8, duplicate keys, NaN, Infinity and out-of-range numbers refused,
    nesting bounded.

    Raises:
        DecodeError: naming what is wrong.
    """
    return _loads(raw, max_size, max_depth)


def _parse_time(value: object) -> datetime:
    if not isinstance(value, str):
        raise DecodeError("field 'occurred_at' must be an ISO 8601 string")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise DecodeError(f"field 'occurred_at' is not an ISO 8601 time: {value[:40]!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _short_or_none(value: object) -> bool:
    """An optional id as decoding accepts it: null, or a string of at most ``MAX_ID_LENGTH``."""
    return value is None or (type(value) is str and len(value) <= MAX_ID_LENGTH)


def event_decoder(build: BuildEvent[E]) -> DecodeEvent[E]:
    """The wire format's decoder, building events with ``build`` (given the
    fields in ``Event``'s order, already validated).

    ``choreo.events`` binds it to ``Event`` as ``decode_event``: the codec sits
    below the event class and never imports it. ``build`` is a closure cell
    here, read as cheaply as a module global.
    """

    def decode_event(raw: bytes, *, max_size: int = DEFAULT_MAX_SIZE, max_depth: int = DEFAULT_MAX_DEPTH) -> E:
        """Parse and validate an event from its wire form.

        Raises:
            DecodeError: with a reason naming what is wrong (size, encoding, JSON,
                nesting, a missing or mistyped field, an invalid type name).
        """
        wire = _loads(raw, max_size, max_depth)
        if not isinstance(wire, dict):
            raise DecodeError(f"message is a JSON {type(wire).__name__}, not an object")
        version = wire.get("v", WIRE_VERSION)
        if type(version) is not int or version != WIRE_VERSION:
            raise DecodeError(f"unknown wire format version {repr(version)[:40]} (this release reads {WIRE_VERSION})")
        event_type = wire.get("type")
        if type(event_type) is not str or event_type not in _valid_types:  # a name seen before: checked
            if "type" not in wire:
                raise DecodeError("missing field 'type'")
            event_type = validate_event_type(event_type)
        data = wire.get("data")
        if type(data) is not dict:  # JSON gives dict, never a subclass
            if "data" not in wire:
                raise DecodeError("missing field 'data'")
            raise DecodeError(f"field 'data' must be a JSON object, not {type(data).__name__}")
        event_id = wire.get("id")
        if not isinstance(event_id, str) or not event_id:
            raise DecodeError("missing or empty field 'id'")
        if len(event_id) > MAX_ID_LENGTH:
            raise DecodeError(f"field 'id' is {len(event_id)} characters, over the limit of {MAX_ID_LENGTH}")
        attempt = wire.get("attempt", 1)
        if type(attempt) is not int or attempt < 1:  # JSON gives int, never a subclass (bool is its own type)
            raise DecodeError("field 'attempt' must be a positive integer")
        headers = wire.get("headers") or {}
        if type(headers) is not dict or (headers and not all(isinstance(v, str) for v in headers.values())):
            raise DecodeError("field 'headers' must be an object of strings")
        # The ids: strings or null (checked inline: this runs for every delivery).
        correlation_id = wire.get("correlation_id")
        causation_id, saga_id = wire.get("causation_id"), wire.get("saga_id")
        if not (
            (correlation_id is None or (type(correlation_id) is str and len(correlation_id) <= MAX_ID_LENGTH))
            and (causation_id is None or (type(causation_id) is str and len(causation_id) <= MAX_ID_LENGTH))
            and (saga_id is None or (type(saga_id) is str and len(saga_id) <= MAX_ID_LENGTH))
        ):  # inline, not by _short_or_none: this runs for every delivery
            for name in ("correlation_id", "causation_id", "saga_id"):
                if not _short_or_none(wire.get(name)):
                    raise DecodeError(f"field {name!r} must be a string of at most {MAX_ID_LENGTH} characters, or null")
        occurred = wire.get("occurred_at")
        return build(
            event_type,
            data,
            event_id,
            correlation_id or event_id,
            causation_id,
            saga_id,
            utcnow() if occurred is None else _parse_time(occurred),
            attempt,
            headers,
        )

    return decode_event
