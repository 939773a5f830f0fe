"""``choreo trace``: one business transaction rebuilt from the streams.

Every event with a correlation id is found where the broker keeps it (its
``Inspection.history``: on Redis the topics' streams, the in-memory broker
only within its own process), then put in causal order: each event under the
handler whose work emitted it. For each handler that took an event, the
outcome is read from the broker's own records: dead-lettered (its dead
letters), retried (the group's private queue of retries, or a delayed
message), still pending or not yet delivered (the group's cursor and
leases), failed (its failure event was emitted, when the apps are given) or
handled.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import attrs

from brokers import Broker, DeadLetterRecord, GroupCursor, Inspection, Subscription
from choreo.errors import DecodeError
from choreo.events import Event, decode_event

if TYPE_CHECKING:
    from choreo.app import App

__all__ = ("Handling", "Trace", "collect", "render_mermaid", "render_tree", "ulid_ms")

#: Most leases, delayed messages and dead letters read.
_MANY = 100_000
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


@attrs.frozen
class Handling:
    """What one consumer group did with one event.

    Attributes:
        group: ``service.handler``.
        outcome: ``success``, ``failed``, ``handled`` (no apps given to tell
            success from failure), ``retrying``, ``dead_lettered``,
            ``in_progress`` or ``waiting``.
        attempts: Attempts seen (retries are separate entries).
        reason: The dead-letter reason, if any.
    """

    group: str
    outcome: str
    attempts: int = 1
    reason: str | None = None


@attrs.frozen
class Trace:
    """The events of one correlation id, in publish order, with their handlings."""

    correlation_id: str
    broker_url: str
    events: tuple[Event, ...]
    handlings: dict[str, tuple[Handling, ...]]
    #: Event id -> the group whose handler emitted it (when the apps tell).
    emitted_by: dict[str, str | None]

    def children(self, event: Event) -> list[Event]:
        return [e for e in self.events if e.causation_id == event.id]

    @property
    def roots(self) -> list[Event]:
        ids = {e.id for e in self.events}
        return [e for e in self.events if e.causation_id not in ids]


@attrs.define
class _History:
    broker_url: str
    #: (topic, entry id, body, private group or None), in queue order.
    entries: list[tuple[str, str, bytes, str | None]] = attrs.Factory(list)
    #: Topic -> the cursors of its groups in the topic's own queue.
    groups: dict[str, list[GroupCursor]] = attrs.Factory(dict)
    #: (group, topic) -> the cursor of the group's private queue.
    private: dict[tuple[str, str], list[GroupCursor]] = attrs.Factory(dict)
    #: Entry ids each group holds uncommitted: (group, topic) -> ids.
    pending: dict[tuple[str, str], frozenset[str]] = attrs.Factory(dict)
    delayed: list[tuple[str, str | None, str]] = attrs.Factory(list)  # topic, group, message id
    dead: list[DeadLetterRecord] = attrs.Factory(list)


def ulid_ms(value: str) -> int | None:
    """The millisecond timestamp of a ULID-shaped id (choreo's event ids)."""
    if len(value) != 26 or any(c not in _CROCKFORD for c in value.upper()):
        return None
    number = 0
    for char in value.upper()[:10]:
        number = number * 32 + _CROCKFORD.index(char)
    return number


# -- reading the broker ------------------------------------------------------------


async def _read(broker: Inspection, correlation_id: str) -> _History:
    """What ``broker`` keeps about ``correlation_id``, through its inspection role."""
    history = _History(broker.url)
    needle = correlation_id.encode()
    # Ids are time-sortable: nothing of this transaction predates its root.
    start_ms = ulid_ms(correlation_id)
    since = None if start_ms is None else max(0, start_ms - 60_000) / 1000
    for entry in await broker.history(containing=needle, since=since):
        history.entries.append((entry.topic, entry.entry_id, entry.body, entry.group))
    subscriptions = []
    for cursor in await broker.cursors():
        if cursor.private:
            history.private.setdefault((cursor.group, cursor.topic), []).append(cursor)
        else:
            history.groups.setdefault(cursor.topic, []).append(cursor)
            # One cursor per partition on Redis Cluster: one subscription each.
            if Subscription(cursor.topic, cursor.group) not in subscriptions:
                subscriptions.append(Subscription(cursor.topic, cursor.group))
    held: dict[tuple[str, str], set[str]] = {}
    for lease in await broker.pending(subscriptions, limit=_MANY):
        held.setdefault((lease.group, lease.topic), set()).add(lease.entry_id)
    history.pending = {group: frozenset(ids) for group, ids in held.items()}
    history.delayed = [(m.topic, m.group, m.message_id) for m in await broker.delayed(limit=_MANY) if needle in m.body]
    history.dead = await broker.dead_letters(limit=_MANY)
    return history


# -- putting it together --------------------------------------------------------


async def collect(broker: str | Broker | None, correlation_id: str, *, apps: Sequence[App] = ()) -> Trace:
    """Every event of ``correlation_id`` on ``broker``, with who handled it and how.

    ``apps`` (optional) name the handler behind each emitted event and tell a
    failure from a success.

    Raises:
        ConfigurationError: an invalid broker URL.
        BrokerUnavailable: the broker cannot be reached.
    """
    from choreo.admin import connected

    async with connected(broker) as instance:
        history = await _read(instance, correlation_id)
    return _assemble(history, correlation_id, apps)


def _assemble(history: _History, correlation_id: str, apps: Sequence[App]) -> Trace:
    routes = {route.group: route for app in apps for route in app.routes}
    events: dict[str, Event] = {}
    placed: dict[str, tuple[str, str]] = {}  # event id -> (topic, entry id) on the shared stream
    retries: dict[tuple[str, str], list[tuple[Event, str]]] = {}  # (group, event id) -> [(event, entry id)]
    for topic, entry_id, body, group in history.entries:
        try:
            event = decode_event(body)
        except DecodeError:
            continue
        if event.correlation_id != correlation_id:
            continue
        if group is None:
            events.setdefault(event.id, event)
            placed.setdefault(event.id, (topic, entry_id))
        else:
            retries.setdefault((group, event.id), []).append((event, entry_id))
            events.setdefault(event.id, attrs.evolve(event, attempt=1))
    ordered = sorted(events.values(), key=lambda e: (e.occurred_at, e.id))
    emitted_by: dict[str, str | None] = {}
    for event in ordered:
        parent = events.get(event.causation_id or "")
        emitted_by[event.id] = None
        if parent is not None:
            for route in routes.values():
                if route.event == parent.type and event.type in route.emits:
                    emitted_by[event.id] = route.group
                    break
    for event in ordered:
        # Without the apps, an event whose parent only one group took came from that group.
        parent = events.get(event.causation_id or "")
        if emitted_by[event.id] is None and parent is not None:
            takers = list(dict.fromkeys(
                v.group for v in history.groups.get(placed.get(parent.id, (parent.type, ""))[0], [])))
            if len(takers) == 1:
                emitted_by[event.id] = takers[0]
    handlings: dict[str, tuple[Handling, ...]] = {}
    for event in ordered:
        topic, entry_id = placed.get(event.id, (event.type, "0-0"))
        groups = list(dict.fromkeys(v.group for v in history.groups.get(topic, [])))
        groups += [g for g, eid in retries if eid == event.id and g not in groups]
        found = []
        for group in groups:
            found.append(_outcome(history, event, topic, entry_id, group, retries.get((group, event.id), []),
                                  routes.get(group), [e for e in ordered if e.causation_id == event.id],
                                  emitted_by))
        handlings[event.id] = tuple(found)
    return Trace(correlation_id, history.broker_url, tuple(ordered), handlings, emitted_by)


def _outcome(
    history: _History,
    event: Event,
    topic: str,
    entry_id: str,
    group: str,
    retried: list[tuple[Event, str]],
    route: Any,
    children: list[Event],
    emitted_by: dict[str, str | None],
) -> Handling:
    attempts = max([1, *(e.attempt for e, _ in retried)])
    for dead in history.dead:
        if dead.group == group and dead.message_id == event.id:
            return Handling(group, "dead_lettered", max(attempts, dead.deliveries), dead.reason)
    if any(t == topic and g == group and m == event.id for t, g, m in history.delayed):
        return Handling(group, "retrying", attempts)
    view = next((v for v in history.groups.get(topic, []) if v.group == group and v.holds(entry_id)), None)
    held = history.pending.get((group, topic), frozenset())
    if retried:
        last = retried[-1][1]
        private = next((c for c in history.private.get((group, topic), []) if c.holds(last)), None)
        if private is not None and (last in held or not private.handed_out(last)):
            return Handling(group, "retrying", attempts)
    elif view is not None:
        if entry_id in held:
            return Handling(group, "in_progress", attempts)
        if not view.handed_out(entry_id):
            return Handling(group, "waiting", attempts)
    mine = [c for c in children if emitted_by.get(c.id) == group]
    if route is None:
        # A failure event carries {"error": {"type", "message"}} that its cause did not have.
        if any(isinstance(c.data.get("error"), dict) and "error" not in event.data for c in mine):
            return Handling(group, "failed", attempts)
        return Handling(group, "success" if mine else "handled", attempts)
    if route.failure_event and any(c.type == route.failure_event for c in mine):
        return Handling(group, "failed", attempts)
    return Handling(group, "success", attempts)


# -- rendering ------------------------------------------------------------------------


def _when(moment: datetime) -> str:
    return moment.strftime("%H:%M:%S.%f")[:-3]


def _describe(handling: Handling) -> str:
    text = handling.outcome.replace("_", " ")
    if handling.attempts > 1:
        text += f" after {handling.attempts} attempts"
    if handling.reason:
        text += f": {handling.reason}"
    return text


def render_tree(trace: Trace) -> str:
    """The transaction as an indented tree: event, the handlers that took it, what they emitted."""
    lines = [f"correlation {trace.correlation_id}: {len(trace.events)} events on {trace.broker_url}"]

    def event_lines(event: Event, first: str, rest: str) -> None:
        lines.append(f"{first}{event.type}  [{event.id}]  {_when(event.occurred_at)}")
        children = trace.children(event)
        handlings = trace.handlings.get(event.id, ())
        groups = {h.group for h in handlings}
        items: list[Handling | Event] = [*handlings, *(c for c in children if trace.emitted_by.get(c.id) not in groups)]
        for index, item in enumerate(items):
            branch, carry = ("└─ ", "   ") if index == len(items) - 1 else ("├─ ", "│  ")
            if isinstance(item, Event):
                event_lines(item, rest + branch, rest + carry)
                continue
            lines.append(f"{rest}{branch}{item.group}: {_describe(item)}")
            emitted = [c for c in children if trace.emitted_by.get(c.id) == item.group]
            for n, child in enumerate(emitted):
                sub_branch, sub_carry = ("└─ ", "   ") if n == len(emitted) - 1 else ("├─ ", "│  ")
                event_lines(child, rest + carry + sub_branch, rest + carry + sub_carry)

    for root in trace.roots:
        event_lines(root, "", "")
    return "\n".join(lines) + "\n"


def render_mermaid(trace: Trace) -> str:
    """The transaction as a Mermaid flowchart: events as nodes, handlers on the edges."""
    ids = {event.id: f"ev{n}" for n, event in enumerate(trace.events)}
    lines = ["flowchart TD"]
    for event in trace.events:
        lines.append(f'    {ids[event.id]}(["{event.type}<br/>{event.id[-8:]}"])')
    links: list[str] = []
    failed_links: list[int] = []
    dead = 0
    for event in trace.events:
        for handling in trace.handlings.get(event.id, ()):
            emitted = [c for c in trace.children(event) if trace.emitted_by.get(c.id) == handling.group]
            label = f"{handling.group}: {handling.outcome}"
            if handling.outcome == "dead_lettered":
                dead += 1
                lines.append(f'    dlq{dead}[["dead letter"]]')
                failed_links.append(len(links))
                links.append(f'    {ids[event.id]} -. "{label}" .-> dlq{dead}')
            for child in emitted:
                if handling.outcome == "failed":
                    failed_links.append(len(links))
                links.append(f'    {ids[event.id]} -- "{label}" --> {ids[child.id]}')
        for child in trace.children(event):
            if trace.emitted_by.get(child.id) is None:
                links.append(f"    {ids[event.id]} --> {ids[child.id]}")
    lines += links
    if failed_links:
        lines.append(f"    linkStyle {','.join(map(str, failed_links))} stroke:#dc2626,stroke-dasharray:5 5")
    return "\n".join(lines) + "\n"
