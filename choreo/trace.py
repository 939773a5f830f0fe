"""``choreo trace``: one business transaction rebuilt from the streams.

Every event with a correlation id is found where the broker keeps it (on
Redis, the ``<prefix>:<type>`` streams, read with XRANGE; the in-memory broker
only within its own process), then put in causal order: each event under the
handler whose work emitted it. For each handler that took an event, the
outcome is read from the broker's own records: dead-lettered (the dead-letter
stream), retried (the group's private stream of retries), still pending or
not yet delivered (the group's cursor and pending list), failed (its failure
event was emitted, when the apps are given) or handled.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import attrs

from brokers import Broker, DeadLetterRecord
from choreo.errors import DecodeError
from choreo.events import Event, decode_event

if TYPE_CHECKING:
    from choreo.app import App

__all__ = ("Handling", "Trace", "collect", "render_mermaid", "render_tree")

#: Entries read per XRANGE call.
_PAGE = 1000
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


@attrs.frozen
class _GroupView:
    name: str
    delivered_upto: tuple[int, int] | None  # last entry handed to the group
    pending: frozenset[str]


@attrs.define
class _History:
    broker_url: str
    #: (topic, entry id, body, private group or None), in stream order.
    entries: list[tuple[str, str, bytes, str | None]] = attrs.Factory(list)
    groups: dict[str, list[_GroupView]] = attrs.Factory(dict)
    #: Private stream views: (group, topic) -> view.
    private: dict[tuple[str, str], _GroupView] = attrs.Factory(dict)
    delayed: list[tuple[str, str | None, str]] = attrs.Factory(list)  # topic, group, message id
    dead: list[DeadLetterRecord] = attrs.Factory(list)


def _entry_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms or 0), int(seq or 0)


def _ulid_ms(value: str) -> int | None:
    """The millisecond timestamp of a ULID-shaped id (choreo's event ids)."""
    if len(value) != 26 or any(c not in _CROCKFORD for c in value.upper()):
        return None
    number = 0
    for char in value.upper()[:10]:
        number = number * 32 + _CROCKFORD.index(char)
    return number


# -- reading the broker ------------------------------------------------------------


def _redis_url(url: str, names: Sequence[str]) -> str:
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in names]
    return urlunsplit(parts._replace(query=urlencode(query)))


async def _redis_history(url: str, correlation_id: str) -> _History:
    import redis.asyncio as aioredis

    from brokers import BrokerOptions, parse_url, redact_url

    _, options = parse_url(url)
    prefix = options.prefix
    # redis-py's reply types are unions of everything; the replies here are known shapes.
    client: Any = aioredis.from_url(_redis_url(url, [f.name for f in attrs.fields(BrokerOptions)]))
    history = _History(redact_url(url))
    # Ids are time-sortable: nothing of this transaction predates its root.
    start_ms = _ulid_ms(correlation_id)
    start = f"{max(0, start_ms - 60_000)}-0" if start_ms is not None else "-"
    try:
        keys = [k.decode() async for k in client.scan_iter(match=f"{prefix}:*", count=1000, _type="stream")]
        for key in sorted(keys):
            rest = key[len(prefix) + 1:]
            if rest == "_dead":
                continue
            group: str | None = None
            if rest.startswith("_group:"):
                group, _, topic = rest[len("_group:"):].partition(":")
            elif rest.startswith("_"):
                continue
            else:
                topic = rest
            cursor = start
            while True:
                page = await client.xrange(key, min=cursor, max="+", count=_PAGE)
                for entry_id, fields in page:
                    body = fields.get(b"body")
                    if body is not None and correlation_id.encode() in body:
                        history.entries.append((topic, entry_id.decode(), bytes(body), group))
                if len(page) < _PAGE:
                    break
                cursor = "(" + page[-1][0].decode()
            views = []
            for info in await client.xinfo_groups(key):
                name = info["name"].decode() if isinstance(info["name"], bytes) else info["name"]
                last = info.get("last-delivered-id", b"0-0")
                last = last.decode() if isinstance(last, bytes) else str(last)
                pending = await client.xpending_range(key, name, min="-", max="+", count=10_000)
                ids = frozenset(p["message_id"].decode() for p in pending)
                views.append(_GroupView(name, _entry_key(last), ids))
            if group is None:
                history.groups[topic] = views
            else:
                view = next((v for v in views if v.name == group), _GroupView(group, None, frozenset()))
                history.private[(group, topic)] = view
        for member in await client.zrange(f"{prefix}:_delayed", 0, -1):
            header, _, body = bytes(member).partition(b"\n")
            if correlation_id.encode() in body:
                topic, group, message_id = json.loads(header)
                history.delayed.append((topic, group, message_id))
        for entry_id, fields in await client.xrange(f"{prefix}:_dead", count=100_000):
            message_id = fields.get(b"message_id")
            history.dead.append(DeadLetterRecord(
                id=entry_id.decode(), topic=fields.get(b"topic", b"").decode(),
                group=fields.get(b"group", b"").decode(),
                message_id=None if message_id is None else message_id.decode(),
                body=bytes(fields.get(b"body", b"")), reason=fields.get(b"reason", b"").decode(errors="replace"),
                deliveries=int(fields.get(b"deliveries", 0)), dead_at=float(fields.get(b"dead_at", 0)),
            ))
    finally:
        await client.aclose()
    return history


def _memory_history(broker: Any) -> _History:
    # The in-memory broker keeps its log in this process only.
    history = _History(broker.url)
    for topic, state in broker._topics.items():
        for entry in state.log:
            history.entries.append((topic, entry.entry_id, entry.body, None))
        views = []
        for name, group in state.groups.items():
            views.append(_GroupView(name, (group.cursor, 0), frozenset(group.pending)))
            for entry in group.private:
                history.entries.append((topic, entry.entry_id, entry.body, name))
            history.private[(name, topic)] = _GroupView(name, None, frozenset(group.pending))
        history.groups[topic] = views
    for _, _, message in broker._delayed:
        history.delayed.append((message.topic, message.group, message.id))
    history.dead = list(broker._dead.values())
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
    from choreo.worker import broker_url_from_env

    if isinstance(broker, str | None) and broker_url_from_env(broker).startswith(("redis://", "rediss://")):
        url = broker_url_from_env(broker)
        async with connected(url):  # a clear error if Redis is down
            pass
        history = await _redis_history(url, correlation_id)
    else:
        async with connected(broker) as instance:
            history = _memory_history(instance) if hasattr(instance, "_topics") else _History(instance.url)
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
            takers = [v.name for v in history.groups.get(placed.get(parent.id, (parent.type, ""))[0], [])]
            if len(takers) == 1:
                emitted_by[event.id] = takers[0]
    handlings: dict[str, tuple[Handling, ...]] = {}
    for event in ordered:
        topic, entry_id = placed.get(event.id, (event.type, "0-0"))
        groups = [v.name for v in history.groups.get(topic, [])]
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
    view = next((v for v in history.groups.get(topic, []) if v.name == group), None)
    if retried:
        private = history.private.get((group, topic))
        last = retried[-1][1]
        if private is not None and (last in private.pending or (
                private.delivered_upto is not None and _entry_key(last) > private.delivered_upto)):
            return Handling(group, "retrying", attempts)
    elif view is not None:
        if entry_id in view.pending:
            return Handling(group, "in_progress", attempts)
        if view.delivered_upto is not None and _entry_key(entry_id) > view.delivered_upto:
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
