"""Dead letters as choreo shows them: the broker's record plus the decoded event."""

from __future__ import annotations

import contextlib

import attrs

from brokers import DeadLetterRecord
from choreo.errors import DecodeError
from choreo.events import Event, decode_event

__all__ = ("DeadLetter",)


@attrs.frozen
class DeadLetter:
    """A message that will not be handled again unless replayed.

    Attributes:
        id: The dead letter's id (for replay).
        topic: The event type (stream) it came from.
        group: The consumer group (``service.handler``) that gave up on it.
        event: The decoded event, or ``None`` if the bytes are not a valid event.
        raw: The original bytes (only the first ``brokers.DEAD_LETTER_KEPT``
            of an oversized entry: then ``size`` and ``sha1`` are set).
        reason: Why, in words.
        attempts: How many times it had been delivered or tried.
        size: The whole entry's size in bytes when ``raw`` is a prefix of it.
        sha1: The whole entry's SHA-1 (hex) when ``raw`` is a prefix of it.
    """

    id: str
    topic: str
    group: str
    event: Event | None
    raw: bytes = attrs.field(repr=False)
    reason: str
    attempts: int
    size: int | None = None
    sha1: str | None = None

    def __str__(self) -> str:
        return f"{self.topic} ({self.group or 'no group'}): {self.reason}"

    @classmethod
    def from_record(cls, record: DeadLetterRecord) -> DeadLetter:
        event: Event | None = None
        if record.size is None:  # a prefix of an oversized entry is no event
            with contextlib.suppress(DecodeError):
                event = decode_event(record.body)
        attempts = max(record.deliveries, event.attempt if event else 0)
        return cls(
            record.id, record.topic, record.group, event, record.body, record.reason, attempts, record.size,
            record.sha1,
        )
