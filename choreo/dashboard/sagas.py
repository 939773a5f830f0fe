"""What the saga pages show: a page of sagas, and one saga's timeline.

Sagas are read through ``SagaQuery`` only (the broker's state or another
store), so the pages show the same records ``choreo saga list`` does. Each
view is a JSON-ready dict: the HTML page and ``/api/`` serve the same one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from choreo.errors import ConfigurationError, DecodeError
from choreo.events import Event, decode_event
from choreo.saga.definition import SagaDefinition, SagaState, StepStatus
from choreo.saga.query import Cursor, SagaQuery
from choreo.saga.record import SagaRecord
from choreo.saga.store import parse_state

if TYPE_CHECKING:
    from brokers import Inspection

__all__ = ("MAX_PAGE", "decode_cursor", "encode_cursor", "saga_page", "saga_view", "stuck", "trace_lines")

#: Most sagas on one page.
MAX_PAGE = 500
#: Most events of one saga listed on its page.
MAX_EVENTS = 500


def encode_cursor(cursor: Cursor) -> str:
    """``created_at:saga_id``, the ``after`` of the next page's URL (``repr`` keeps the float exact)."""
    return f"{cursor.created_at!r}:{cursor.saga_id}"


def decode_cursor(text: str | None) -> Cursor | None:
    """The cursor of ``encode_cursor``; ``None`` for none.

    Raises:
        ConfigurationError: not a cursor this dashboard wrote.
    """
    if not text:
        return None
    created, _, saga_id = text.partition(":")
    try:
        return Cursor(float(created), saga_id)
    except ValueError:
        raise ConfigurationError(f"invalid page cursor {text!r}") from None


def stuck(record: SagaRecord, now: float) -> str | None:
    """Why a person should look at this saga, or ``None``: it failed, or it is
    still running past the timeout of its current command or its deadline."""
    if record.state is SagaState.FAILED:
        return "failed: a compensation did not succeed"
    if record.state.terminal:
        return None
    passed = [moment for moment in (record.due_at, record.deadline_at) if moment is not None and now > moment]
    if passed:
        return f"{record.state.value} {now - min(passed):.0f}s past its timeout"
    return None


def _done(record: SagaRecord) -> int:
    return sum(1 for step in record.steps if step.status == StepStatus.SUCCEEDED)


def _row(record: SagaRecord, now: float) -> dict[str, Any]:
    return {
        "saga_id": record.saga_id,
        "name": record.name,
        "version": record.version,
        "state": record.state.value,
        "steps_done": _done(record),
        "steps": len(record.steps),
        "created_at": record.created_at,
        "updated_at": record.updated_at,
        "error": record.error,
        "stuck": stuck(record, now),
        "correlation_id": record.correlation,
    }


async def saga_page(
    query: SagaQuery,
    *,
    state: str | None = None,
    name: str | None = None,
    after: str | None = None,
    limit: int = 50,
    now: float | None = None,
) -> dict[str, Any]:
    """One page of sagas, newest first, with the count in each state.

    Raises:
        ConfigurationError: an unknown state, a bad cursor or limit.
    """
    if not 1 <= limit <= MAX_PAGE:
        raise ConfigurationError(f"limit must be between 1 and {MAX_PAGE}, not {limit}")
    wanted = parse_state(state or None)
    name = name or None
    # Asked together: a store that reads everything (broker state) reads once for both.
    records, counts = await asyncio.gather(
        query.page_records(state=wanted, name=name, after=decode_cursor(after), limit=limit + 1),
        query.count_records(name=name),
    )
    more = len(records) > limit
    records = records[:limit]
    moment = time.time() if now is None else now
    return {
        "state": None if wanted is None else wanted.value,
        "name": name,
        "limit": limit,
        "counts": {s.value: counts.get(s, 0) for s in SagaState},
        "sagas": [_row(record, moment) for record in records],
        "next": encode_cursor(Cursor.after(records[-1])) if more else None,
    }


def _span(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else round(end - start, 6)


def _steps(record: SagaRecord, definition: SagaDefinition | None) -> list[dict[str, Any]]:
    stage_of = {} if definition is None else {i: definition.stage(i) for i in range(len(definition.steps))}
    steps = []
    for index, step in enumerate(record.steps):
        group = stage_of.get(index, (index,))
        steps.append({
            "index": index,
            "name": step.name,
            "status": step.status.value,
            "parallel_with": [record.steps[i].name for i in group if i != index and i < len(record.steps)],
            "attempts": step.attempts,
            "error": step.error,
            "started_at": step.started_at,
            "finished_at": step.finished_at,
            "duration": _span(step.started_at, step.finished_at),
            "compensation_attempts": step.comp_attempts,
            "compensation_error": step.comp_error,
            "compensation_started_at": step.comp_started_at,
            "compensation_finished_at": step.comp_finished_at,
            "compensation_duration": _span(step.comp_started_at, step.comp_finished_at),
            "late": None if step.late is None else step.late.value,
        })
    return steps


def trace_lines(record: SagaRecord) -> list[dict[str, Any]]:
    """The ``[SAGA-id]`` trace of the saga, rebuilt from its record in the
    words the coordinator logs them with, oldest first."""
    total = len(record.steps)
    lines: list[tuple[float, int, str]] = [(record.created_at, 0, f"Starting saga: {record.name}")]
    for index, step in enumerate(record.steps):
        where = f"Step {index + 1}/{total}: {step.name}"
        if step.attempts > 1 and step.started_at is not None:
            lines.append((step.started_at, 1, f"{where} - {step.attempts} attempts"))
        if step.finished_at is not None:
            failed = step.error is not None and step.status in (StepStatus.FAILED, StepStatus.SKIPPED)
            lines.append((step.finished_at, 2, f"{where} - {'FAILED' if failed else 'COMPLETED'}"))
        if step.comp_started_at is not None:
            lines.append((step.comp_started_at, 3, f"Compensating: {step.name}"))
        if step.comp_finished_at is not None:
            if step.status == StepStatus.COMPENSATION_FAILED:
                message = (step.comp_error or {}).get("message", "")
                text = f"Compensation failed: {step.name} after {step.comp_attempts} attempts: {message}"
            else:
                text = f"Compensated: {step.name}"
            lines.append((step.comp_finished_at, 4, text))
    if record.state.terminal:
        lines.append((record.updated_at, 9, f"Saga {record.state.value.upper()}"))
    lines.sort(key=lambda line: (line[0], line[1]))
    return [{"at": at, "line": f"[SAGA-{record.saga_id}] {text}"} for at, _, text in lines]


async def _events(broker: Inspection, record: SagaRecord) -> list[Event]:
    found: dict[str, Event] = {}
    since = max(0.0, record.created_at - 60)
    for entry in await broker.history(containing=record.saga_id.encode(), since=since):
        try:
            event = decode_event(entry.body)
        except DecodeError:
            continue
        if event.saga_id == record.saga_id or event.correlation_id == record.correlation:
            found.setdefault(event.id, event)
    return sorted(found.values(), key=lambda e: (e.occurred_at, e.id))[:MAX_EVENTS]


async def saga_view(
    query: SagaQuery,
    broker: Inspection | None,
    saga_id: str,
    definitions: Mapping[str, SagaDefinition] | None = None,
    now: float | None = None,
) -> dict[str, Any] | None:
    """One saga: its steps with attempts, timings and compensations, its
    trace and the events the broker still keeps of it; ``None`` if unknown."""
    record = await query.get_record(saga_id)
    if record is None:
        return None
    definition = (definitions or {}).get(record.name)
    if definition is not None:
        record.name_steps(definition)
    events: Sequence[Event] = () if broker is None else await _events(broker, record)
    moment = time.time() if now is None else now
    started = min([s.started_at for s in record.steps if s.started_at is not None], default=record.created_at)
    return {
        **_row(record, moment),
        "schema": record.schema,
        "phase": record.phase.value,
        "data": record.data,
        "due_at": record.due_at,
        "deadline_at": record.deadline_at,
        "timeline_start": min(started, record.created_at),
        "timeline_end": max(record.updated_at, moment if not record.state.terminal else record.updated_at),
        "steps": _steps(record, definition),
        "trace": trace_lines(record),
        "events": [
            {"id": e.id, "type": e.type, "occurred_at": e.occurred_at.timestamp(), "attempt": e.attempt,
             "causation_id": e.causation_id, "correlation_id": e.correlation_id, "data": e.data}
            for e in events
        ],
    }
