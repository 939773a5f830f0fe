"""One choreographed transaction as a sequence diagram across services.

``choreo.trace.collect`` rebuilds the transaction from the streams (what
``choreo trace`` prints); this lays it out: a lifeline per service, and per
event one arrow from the service whose handler emitted it to each service
whose handler took it, labelled with the event and the handler's outcome.
The template draws the shapes; every text is escaped there.
"""

from __future__ import annotations

from typing import Any

from choreo.trace import Trace, render_tree

__all__ = ("OUTSIDE", "sequence_view")

#: The lifeline of events published from outside any handler.
OUTSIDE = "(publisher)"
LANE = 190
ROW = 46
TOP = 56
LEFT = 100

_FAILED = ("failed", "dead_lettered")
_OPEN = ("retrying", "in_progress", "waiting")


def _service(group: str | None) -> str:
    return OUTSIDE if group is None else group.partition(".")[0]


def sequence_view(trace: Trace) -> dict[str, Any]:
    """The transaction as JSON-ready data: its events with their handlings,
    and the lanes and arrows of its sequence diagram."""
    lanes: list[str] = [OUTSIDE]
    arrows: list[dict[str, Any]] = []
    events = []
    for event in trace.events:
        source = _service(trace.emitted_by.get(event.id))
        if source not in lanes:
            lanes.append(source)
        handlings = trace.handlings.get(event.id, ())
        for handling in handlings:
            target = _service(handling.group)
            if target not in lanes:
                lanes.append(target)
            arrows.append({"event_id": event.id, "event": event.type, "source": source, "target": target,
                           "handler": handling.group, "outcome": handling.outcome, "attempts": handling.attempts,
                           "reason": handling.reason})
        if not handlings:
            arrows.append({"event_id": event.id, "event": event.type, "source": source, "target": source,
                           "handler": None, "outcome": "not_consumed", "attempts": 0, "reason": None})
        events.append({
            "id": event.id, "type": event.type, "occurred_at": event.occurred_at.timestamp(),
            "causation_id": event.causation_id, "saga_id": event.saga_id, "emitted_by": trace.emitted_by.get(event.id),
            "data": event.data,
            "handlings": [{"group": h.group, "outcome": h.outcome, "attempts": h.attempts, "reason": h.reason}
                          for h in handlings],
        })
    x = {lane: LEFT + n * LANE for n, lane in enumerate(lanes)}
    for row, arrow in enumerate(arrows):
        arrow["y"] = TOP + 30 + row * ROW
        arrow["x1"], arrow["x2"] = x[arrow["source"]], x[arrow["target"]]
        arrow["tone"] = "bad" if arrow["outcome"] in _FAILED else "open" if arrow["outcome"] in _OPEN else "ok"
    return {
        "correlation_id": trace.correlation_id,
        "events": events,
        "diagram": {
            "lanes": [{"name": lane, "x": x[lane]} for lane in lanes],
            "arrows": arrows,
            # Room on the right for the label of an event nobody took (a loop on the last lane).
            "width": LEFT * 2 + (len(lanes) - 1) * LANE + 160,
            "height": TOP + 60 + len(arrows) * ROW,
            "top": TOP,
        },
        "tree": render_tree(trace) if trace.events else "",
    }
