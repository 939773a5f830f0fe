"""The event record and its JSON wire format."""

from __future__ import annotations

import json
import os
import threading
from datetime import UTC, datetime, timedelta, timezone

import pytest

from choreo import DecodeError, Event
from choreo.events import decode_event, encode_event, new_event_id


def test_event_round_trips_through_the_wire_format() -> None:
    """Encoding then decoding gives the same event, every field included."""
    event = Event(
        "order.created",
        {"order_id": "O-1", "lines": [{"sku": "A", "qty": 2}], "note": "naïve ☃"},
        correlation_id="c-1",
        causation_id="e-0",
        saga_id="s-1",
        attempt=3,
        headers={"tenant": "acme"},
    )
    assert decode_event(encode_event(event)) == event


def test_wire_format_is_plain_json_with_named_fields() -> None:
    """Other languages can read the wire format: a JSON object with readable fields."""
    event = Event("order.created", {"a": 1}, occurred_at=datetime(2026, 1, 2, tzinfo=UTC))
    wire = json.loads(encode_event(event))
    assert wire["type"] == "order.created" and wire["data"] == {"a": 1} and wire["id"] == event.id
    assert wire["occurred_at"] == "2026-01-02T00:00:00+00:00"


@pytest.mark.parametrize(
    "moment",
    [
        datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
        datetime(2026, 1, 2, 3, 4, 5, 7, tzinfo=UTC),  # the same second again
        datetime(2026, 1, 2, 3, 4, 6, tzinfo=UTC),  # no microseconds
        datetime(2026, 1, 2, 3, 4, 5, 999_999, tzinfo=timezone(timedelta(hours=-5))),
    ],
)
def test_occurred_at_is_written_in_iso_8601_and_read_back(moment: datetime) -> None:
    """The time on the wire is ISO 8601 as Python writes it, offsets kept, and decodes to the same instant."""
    event = Event("order.created", occurred_at=moment)
    body = encode_event(event)
    assert json.loads(body)["occurred_at"] == moment.isoformat()
    assert decode_event(body).occurred_at == moment


def test_ids_are_unique_and_time_sortable() -> None:
    """Ids made later sort after ids made earlier (to the millisecond) and never repeat."""
    ids = [new_event_id() for _ in range(2000)]
    assert len(set(ids)) == 2000
    assert [i[:10] for i in ids] == sorted(i[:10] for i in ids)
    assert all(len(i) == 26 for i in ids)


def test_ids_made_at_once_by_threads_never_repeat() -> None:
    """Ids of one millisecond share a prefix and count up under it; threads
    counting under the same prefix still get numbers of their own."""
    made: list[list[str]] = [[] for _ in range(8)]

    def make(into: list[str]) -> None:
        into.extend(new_event_id() for _ in range(20_000))

    threads = [threading.Thread(target=make, args=(into,)) for into in made]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [i for ids in made for i in ids]
    assert len(set(every)) == len(every) == 160_000


def test_a_forked_child_does_not_number_ids_under_its_parents_prefix() -> None:
    """A child forked in the middle of a millisecond draws a prefix of its own."""
    reader, writer = os.pipe()
    parent = [new_event_id() for _ in range(100)]
    pid = os.fork()
    if pid == 0:  # the child: report its ids and leave at once
        os.write(writer, json.dumps([new_event_id() for _ in range(100)]).encode())
        os._exit(0)
    os.close(writer)
    with os.fdopen(reader) as pipe:
        child = json.loads(pipe.read())
    os.waitpid(pid, 0)
    parent += [new_event_id() for _ in range(100)]
    assert not set(child) & set(parent)
    assert {i[10:22] for i in child}.isdisjoint(i[10:22] for i in parent)


def test_root_event_correlates_to_itself() -> None:
    """A new event with no correlation id is the root of its own transaction."""
    event = Event("order.created")
    assert event.correlation_id == event.id and event.causation_id is None and event.attempt == 1


def test_events_are_immutable() -> None:
    """Events are values: fields cannot be reassigned."""
    event = Event("order.created")
    with pytest.raises(AttributeError):
        event.type = "other"  # type: ignore[misc]


@pytest.mark.parametrize("name", ["", "has space", "a..b", ".a", "a.", "x" * 201, "a/b", "ünï", "order.created\n"])
def test_invalid_event_types_are_refused(name: str) -> None:
    """Type names become stream keys, so only dotted safe names pass."""
    with pytest.raises(DecodeError, match="invalid event type"):
        encode_event(Event(name))


def test_decoding_checks_size_before_parsing() -> None:
    """An oversized body is refused by length, not parsed."""
    with pytest.raises(DecodeError, match="over the 10-byte limit"):
        decode_event(b"{" * 11, max_size=10)
