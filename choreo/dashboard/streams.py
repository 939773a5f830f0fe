"""What the stream pages show: dead letters, and the live event flow.

Everything is read through the broker's ``Inspection`` role. The flow's
rates come from the entries the broker still keeps of the last ``window``
seconds (an event id tells when it was made); the age of a group's oldest
lease is when the dashboard first saw that lease, unless the entry is recent
enough to be in that window (then its event's own time), since a lease
carries no time of its own.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs

from brokers import Inspection, Subscription
from choreo.dead_letters import DeadLetter
from choreo.errors import ConfigurationError, DecodeError
from choreo.events import decode_event
from choreo.graph import EventGraph
from choreo.trace import ulid_ms

if TYPE_CHECKING:
    from choreo.app import App

__all__ = ("MAX_DEAD_LETTERS", "FlowSampler", "dead_letter_page", "flow_view")

#: Most dead letters the page reads (oldest first): the deepest page there is.
MAX_DEAD_LETTERS = 100_000
#: Characters of a payload shown before it is cut.
PAYLOAD_SHOWN = 4000


def _payload(letter: DeadLetter) -> str:
    if letter.event is not None:
        text = json.dumps(letter.event.data, indent=2, ensure_ascii=False, sort_keys=True)
    else:
        text = letter.raw.decode("utf-8", "replace")
    return text if len(text) <= PAYLOAD_SHOWN else text[:PAYLOAD_SHOWN] + f"... ({len(text)} characters)"


def _letter(letter: DeadLetter) -> dict[str, Any]:
    event = letter.event
    return {
        "id": letter.id,
        "topic": letter.topic,
        "group": letter.group,
        "handler": letter.group or None,
        "attempts": letter.attempts,
        "reason": letter.reason,
        "event_id": None if event is None else event.id,
        "correlation_id": None if event is None else event.correlation_id,
        "saga_id": None if event is None else event.saga_id,
        "payload": _payload(letter),
        "size": letter.size,
        "sha1": letter.sha1,
        "replayable": letter.size is None,
    }


async def dead_letter_page(broker: Inspection, *, offset: int = 0, limit: int = 50) -> dict[str, Any]:
    """Dead letters ``offset`` to ``offset + limit``, oldest first.

    Raises:
        ConfigurationError: an offset or limit out of range.
    """
    if not 1 <= limit <= 500 or not 0 <= offset <= MAX_DEAD_LETTERS - limit:
        raise ConfigurationError(f"offset must be 0 to {MAX_DEAD_LETTERS - limit} and limit 1 to 500")
    # The contract lists from the oldest: reading one past the page tells whether another follows.
    records = await broker.dead_letters(limit=offset + limit + 1)
    page = [DeadLetter.from_record(record) for record in records[offset:offset + limit]]
    return {
        "offset": offset,
        "limit": limit,
        "dead_letters": [_letter(letter) for letter in page],
        "next_offset": offset + limit if len(records) > offset + limit else None,
    }


@attrs.define
class FlowSampler:
    """What the flow page remembers between two looks at the broker: when it
    first saw each group's oldest lease (a lease carries no time)."""

    window: float = 60.0
    first_seen: dict[tuple[str, str, str], float] = attrs.Factory(dict)

    def age(self, topic: str, group: str, entry_id: str, now: float) -> float:
        key = (topic, group, entry_id)
        seen = self.first_seen.setdefault(key, now)
        # Only the oldest lease of each group is remembered.
        for other in [k for k in self.first_seen if k[:2] == key[:2] and k != key]:
            del self.first_seen[other]
        return now - seen


def _node_ids(graph: EventGraph) -> tuple[dict[str, str], dict[str, str]]:
    events = {event: f"e{n}" for n, event in enumerate(graph.events)}
    handlers = {route.group: f"h{n}" for n, route in enumerate(graph.routes)}
    return events, handlers


def _layout(graph: EventGraph) -> dict[str, tuple[int, int]]:
    """Columns by distance from the events nothing emits, rows in first-seen order."""
    emitted = {edge.event for edge in graph.emitted}
    depth: dict[str, int] = {}
    frontier = [f"event:{e}" for e in graph.events if e not in emitted] or [f"event:{e}" for e in graph.events[:1]]
    for node in frontier:
        depth[node] = 0
    while frontier:
        following = []
        for node in frontier:
            kind, _, name = node.partition(":")
            if kind == "event":
                targets = [f"handler:{r.group}" for r in graph.consumers(name)]
            else:
                targets = [f"event:{e.event}" for e in graph.emitted if e.group == name]
            for target in targets:
                if target not in depth:
                    depth[target] = depth[node] + 1
                    following.append(target)
        frontier = following
    column_max = max(depth.values(), default=0)
    for node in [f"event:{e}" for e in graph.events] + [f"handler:{r.group}" for r in graph.routes]:
        depth.setdefault(node, column_max + 1)  # on a cycle unreachable from an entry
    rows: dict[int, int] = {}
    placed = {}
    for node, column in depth.items():
        placed[node] = (column, rows.get(column, 0))
        rows[column] = rows.get(column, 0) + 1
    return placed


async def flow_view(
    broker: Inspection | None, apps: Sequence[App], sampler: FlowSampler, now: float | None = None
) -> dict[str, Any]:
    """The event-flow graph of ``apps`` with each edge's rate over the
    sampler's window, and each consumer group's health (lag, pending,
    delayed, oldest lease)."""
    graph = EventGraph.from_apps(apps)
    moment = time.time() if now is None else now
    per_topic: dict[str, int] = {}
    per_cause: dict[tuple[str, str], int] = {}  # (parent type, type) -> events
    born: dict[str, float] = {}  # entry id -> when its event was made
    if broker is not None:
        recent = [e for e in await broker.history(since=moment - sampler.window) if e.group is None]
        types: dict[str, str] = {}
        parents: dict[str, str | None] = {}
        for entry in recent:
            made = ulid_ms(entry.message_id or "")
            if made is None or made / 1000 < moment - sampler.window:
                continue
            born[entry.entry_id] = made / 1000
            per_topic[entry.topic] = per_topic.get(entry.topic, 0) + 1
            try:
                event = decode_event(entry.body)
            except DecodeError:
                continue
            types[event.id] = event.type
            parents[event.id] = event.causation_id
        for event_id, parent in parents.items():
            if parent in types:
                key = (types[parent], types[event_id])
                per_cause[key] = per_cause.get(key, 0) + 1
    events, handlers = _node_ids(graph)
    places = _layout(graph)
    nodes = [{"id": events[e], "kind": "event", "label": e, "failure": e in graph.failure_events,
              "column": places[f"event:{e}"][0], "row": places[f"event:{e}"][1],
              "rate": per_topic.get(e, 0) / sampler.window} for e in graph.events]
    nodes += [{"id": handlers[r.group], "kind": "handler", "label": r.name, "service": r.service, "group": r.group,
               "failure": False,
               "column": places[f"handler:{r.group}"][0], "row": places[f"handler:{r.group}"][1]}
              for r in graph.routes]
    by_group = {route.group: route for route in graph.routes}
    edges = [{"source": events[r.event], "target": handlers[r.group], "kind": "consumes",
              "rate": per_topic.get(r.event, 0) / sampler.window} for r in graph.routes]
    edges += [{"source": handlers[e.group], "target": events[e.event], "kind": e.kind,
               "rate": per_cause.get((by_group[e.group].event, e.event), 0) / sampler.window}
              for e in graph.emitted]
    return {
        "window": sampler.window,
        "nodes": nodes,
        "edges": edges,
        "streams": [] if broker is None else await _health(broker, graph, sampler, born, moment),
    }


async def _health(
    broker: Inspection, graph: EventGraph, sampler: FlowSampler, born: dict[str, float], now: float
) -> list[dict[str, Any]]:
    subscriptions = [Subscription(route.event, route.group) for route in graph.routes]
    if not subscriptions:
        subscriptions = [Subscription(c.topic, c.group) for c in await broker.cursors() if not c.private]
    oldest: dict[tuple[str, str], str] = {}
    for lease in await broker.pending(subscriptions, limit=1):
        oldest.setdefault((lease.topic, lease.group), lease.entry_id)
    rows = []
    for backlog in await broker.backlog(subscriptions):
        entry_id = oldest.get((backlog.topic, backlog.group))
        age = None
        if entry_id is not None:
            seen = sampler.age(backlog.topic, backlog.group, entry_id, now)
            age = now - born[entry_id] if entry_id in born else seen
        rows.append({"topic": backlog.topic, "group": backlog.group, "lag": backlog.ready,
                     "pending": backlog.pending, "delayed": backlog.delayed, "oldest_pending_age": age,
                     "oldest_pending_exact": entry_id is not None and entry_id in born})
    return rows


def check_ids(ids: object) -> list[str]:
    """Dead-letter ids from a request: a non-empty list of strings.

    Raises:
        ConfigurationError: anything else.
    """
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) and 0 < len(i) <= 200 for i in ids):
        raise ConfigurationError("ids must be a non-empty list of dead-letter ids")
    return ids
