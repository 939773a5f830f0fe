"""Correlated logs: every record written while an event is handled carries its ids.

The dispatcher sets a context variable around each delivery (``enter`` /
``leave``); ``CorrelationFilter`` copies the ids onto every log record,
whichever logger wrote it (the handler's own, a library's, the dispatcher's).
Context variables follow ``await`` and are copied into the threads that run
sync handlers, so those are covered too.

``configure_logging(level, fmt)`` installs one stream handler with the filter
and a text or JSON formatter; ``choreo worker --log-format json`` uses it.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from choreo.events import Event

__all__ = (
    "LOG_FIELDS",
    "CorrelationFilter",
    "HandlingContext",
    "JsonFormatter",
    "TextFormatter",
    "configure_logging",
    "current",
    "handling",
)

#: Attributes ``CorrelationFilter`` sets on every record (``None`` outside a handler).
LOG_FIELDS = ("correlation_id", "event_id", "saga_id", "event_type", "handler")

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(correlation_id)s %(event_id)s] %(message)s"


class HandlingContext(NamedTuple):
    """What is being handled right now in this task or thread.

    A named tuple, not an attrs class: one is built for every event handled.
    """

    correlation_id: str
    event_id: str
    saga_id: str | None
    event_type: str
    handler: str  # the consumer group, ``service.handler``


# The event and group, as given: the HandlingContext is built only when a log
# record asks for it, not for every event handled.
_Marked = tuple["Event", str] | HandlingContext
_current: contextvars.ContextVar[_Marked | None] = contextvars.ContextVar("choreo_handling", default=None)


def current() -> HandlingContext | None:
    """The event being handled in this context, if any."""
    marked = _current.get()
    if marked is None or isinstance(marked, HandlingContext):
        return marked
    event, group = marked
    return HandlingContext(event.correlation_id, event.id, event.saga_id, event.type, group)


def enter(event: Event, group: str) -> contextvars.Token[_Marked | None]:
    """Mark ``event`` as being handled by ``group`` until ``leave(token)``."""
    return _current.set((event, group))


def leave(token: contextvars.Token[_Marked | None]) -> None:
    """Undo the ``enter`` that returned ``token``."""
    _current.reset(token)


@contextlib.contextmanager
def handling(event: Event, group: str) -> Iterator[HandlingContext]:
    """Mark ``event`` as being handled by ``group`` for the duration of the block."""
    context = HandlingContext(event.correlation_id, event.id, event.saga_id, event.type, group)
    token = _current.set(context)
    try:
        yield context
    finally:
        _current.reset(token)


class CorrelationFilter(logging.Filter):
    """Adds ``LOG_FIELDS`` to each record; never drops one.

    Values a record already has (``extra=``, or ``ctx.logger``) are kept.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        context = current()
        for name in LOG_FIELDS:
            if getattr(record, name, None) is None:
                setattr(record, name, getattr(context, name) if context is not None else None)
        return True


class TextFormatter(logging.Formatter):
    """``time LEVEL logger [correlation event] message``; ``-`` outside a handler."""

    def __init__(self, fmt: str = TEXT_FORMAT) -> None:
        super().__init__(fmt)

    def format(self, record: logging.LogRecord) -> str:
        # Records that did not pass through the filter (another handler) still format.
        saved = {name: getattr(record, name, None) for name in LOG_FIELDS}
        for name, value in saved.items():
            setattr(record, name, "-" if value is None else value)
        try:
            return super().format(record)
        finally:
            for name, value in saved.items():
                setattr(record, name, value)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``message``, the
    correlation fields, and ``exc_info`` as text when there is an exception."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in LOG_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        line["process"] = record.process
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure_logging(level: str | int = "INFO", fmt: str = "text", stream: IO[str] | None = None) -> logging.Handler:
    """Send every log record to ``stream`` (stderr) in ``fmt`` (``text`` or ``json``),
    with the correlation fields; replaces handlers a previous call installed.

    Raises:
        ValueError: an unknown level or format.
    """
    if fmt not in ("text", "json"):
        raise ValueError(f"unknown log format {fmt!r}: use text or json")
    if isinstance(level, str):
        resolved = logging.getLevelName(level.upper())
        if not isinstance(resolved, int):
            raise ValueError(f"unknown log level {level!r}: use DEBUG, INFO, WARNING, ERROR or CRITICAL")
        level = resolved
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(CorrelationFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler._choreo = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_choreo", False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
