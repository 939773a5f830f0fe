"""Events: immutable facts that tie into business transactions.

An event is a type such as ``"order.created"``, a JSON object of data, and the
ids that tie it into a business transaction. Its JSON wire format is in
``choreo.codec``; the names of that format used with events are importable
from here too (``encode_event``, ``decode_event``, ``new_event_id``...).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

import attrs

from brokers.speedups import slot_setters
from choreo.codec import (
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_SIZE,
    EVENT_TYPE_PATTERN,
    MAX_TYPE_LENGTH,
    WIRE_VERSION,
    encode_event,
    event_decoder,
    new_event_id,
    utcnow,
    validate_event_type,
    validate_id,
)

__all__ = (
    "DEFAULT_MAX_DEPTH",
    "DEFAULT_MAX_SIZE",
    "EVENT_TYPE_PATTERN",
    "MAX_TYPE_LENGTH",
    "WIRE_VERSION",
    "Event",
    "decode_event",
    "encode_event",
    "child_event",
    "new_event_id",
    "validate_event_type",
)


def _check_id(instance: object, attribute: attrs.Attribute[Any], value: str | None) -> None:
    # Events built on the per-event path (decode, child_event) skip __init__
    # and so this check: their ids were made by choreo or length-checked.
    if value is not None and not (value == "" and attribute.name == "correlation_id"):
        validate_id(attribute.name, value)


def _data_converter(data: Mapping[str, Any] | None) -> dict[str, Any]:
    return {} if data is None else dict(data)


@attrs.frozen
class Event:
    """One event, as published and as handlers receive it.

    Attributes:
        type: The event type, e.g. ``"order.created"``.
        data: The payload, a JSON object.
        id: Unique and time-sortable; retries keep it, so consumers dedupe on it.
            Ids (this one and the three below) are 1 to 128 letters, digits
            or ``._:-``; anything else raises ``DecodeError``.
        correlation_id: Shared by every event of one business transaction.
        causation_id: The id of the event whose handler emitted this one.
        saga_id: The saga this event belongs to, if any.
        occurred_at: When it was first published (UTC).
        attempt: 1 on first handling; a retry carries ``attempt + 1``.
        headers: String metadata.
    """

    type: str
    data: dict[str, Any] = attrs.field(factory=dict, converter=_data_converter)
    id: str = attrs.field(factory=new_event_id, validator=_check_id)
    correlation_id: str = attrs.field(default="", validator=_check_id)
    causation_id: str | None = attrs.field(default=None, validator=_check_id)
    saga_id: str | None = attrs.field(default=None, validator=_check_id)
    occurred_at: datetime = attrs.field(factory=utcnow)
    attempt: int = 1
    headers: dict[str, str] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        if not self.correlation_id:
            # A root event starts its own transaction.
            object.__setattr__(self, "correlation_id", self.id)


_new = object.__new__
(_set_type, _set_data, _set_id, _set_correlation, _set_causation, _set_saga, _set_occurred, _set_attempt,
 _set_headers) = slot_setters(Event)


def _trusted_event(
    event_type: str,
    data: dict[str, Any],
    event_id: str,
    correlation_id: str,
    causation_id: str | None,
    saga_id: str | None,
    occurred_at: datetime,
    attempt: int,
    headers: dict[str, str],
) -> Event:
    """Build an Event from values already validated, skipping ``__init__``.

    The per-event path (decode, and every event a handler emits) builds events
    at a rate where attrs' converters and factories dominate; this is the same
    result without them (``brokers.speedups.slot_setters``): ``data`` is
    already a dict and ``correlation_id`` already filled in.
    """
    event = _new(Event)
    _set_type(event, event_type)
    _set_data(event, data)
    _set_id(event, event_id)
    _set_correlation(event, correlation_id)
    _set_causation(event, causation_id)
    _set_saga(event, saga_id)
    _set_occurred(event, occurred_at)
    _set_attempt(event, attempt)
    _set_headers(event, headers)
    return event


def child_event(cause: Event, event_type: str, data: dict[str, Any], headers: dict[str, str] | None = None) -> Event:
    """An event emitted while handling ``cause``: correlation and saga ids
    propagate, ``causation_id`` names the cause. ``event_type`` must be valid."""
    return _trusted_event(
        event_type,
        data,
        new_event_id(),
        cause.correlation_id,
        cause.id,
        cause.saga_id,
        utcnow(),
        1,
        dict(headers) if headers else {},
    )


def with_headers(event: Event, headers: dict[str, str]) -> Event:
    """``event`` with ``headers`` (a dict of its own): ``attrs.evolve`` without
    re-running the id checks of an event that passed them already (a root
    commit copies each event so middleware can add to its headers)."""
    return _trusted_event(
        event.type, event.data, event.id, event.correlation_id, event.causation_id, event.saga_id,
        event.occurred_at, event.attempt, headers,
    )


#: Parse and validate an event from its wire form (``choreo.codec``).
decode_event = event_decoder(_trusted_event)
