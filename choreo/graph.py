"""The event flow of a whole system, drawn from the routing tables of its apps.

``EventGraph.from_apps(*apps)`` links each event to the handlers that consume
it and each handler to the events it declares (success first, failure second).
``to_mermaid`` and ``to_dot`` draw it, failure edges dashed and red;
``choreo.checks`` looks for what is missing or looping.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from choreo.app import App
    from choreo.routing import Route

__all__ = ("Edge", "EventGraph", "to_dot", "to_mermaid")

#: Edge kinds: the first declared event, the failure (second) event, any other.
SUCCESS, FAILURE, OTHER = "success", "failure", "other"


@attrs.frozen
class Edge:
    """Handler ``group`` may emit ``event`` (kind: success, failure or other)."""

    group: str
    event: str
    kind: str


@attrs.frozen
class EventGraph:
    """Events, handlers and the edges between them.

    Attributes:
        routes: Every route of the given apps, in app then registration order.
        emitted: Handler-to-event edges, from ``@emits`` declarations.
    """

    routes: tuple[Route, ...]
    emitted: tuple[Edge, ...]

    @classmethod
    def from_apps(cls, apps: Iterable[App]) -> EventGraph:
        routes = tuple(route for app in apps for route in app.routes)
        return cls.from_routes(routes)

    @classmethod
    def from_routes(cls, routes: Sequence[Route]) -> EventGraph:
        edges = []
        for route in routes:
            for index, event in enumerate(route.emits):
                kind = SUCCESS if index == 0 else FAILURE if index == 1 else OTHER
                edges.append(Edge(route.group, event, kind))
        return cls(tuple(routes), tuple(edges))

    @property
    def events(self) -> list[str]:
        """Every event type, consumed or emitted, in first-seen order."""
        seen: dict[str, None] = {}
        for route in self.routes:
            seen.setdefault(route.event)
            for event in route.emits:
                seen.setdefault(event)
        return list(seen)

    def consumers(self, event: str) -> list[Route]:
        return [route for route in self.routes if route.event == event]

    def producers(self, event: str) -> list[Edge]:
        return [edge for edge in self.emitted if edge.event == event]

    @property
    def failure_events(self) -> set[str]:
        return {edge.event for edge in self.emitted if edge.kind == FAILURE}

    def successors(self) -> dict[str, list[str]]:
        """Adjacency over event types: ``a -> b`` if a handler of ``a`` may emit ``b``."""
        by_group = {route.group: route for route in self.routes}
        adjacency: dict[str, list[str]] = {event: [] for event in self.events}
        for edge in self.emitted:
            source = by_group[edge.group].event
            if edge.event not in adjacency[source]:
                adjacency[source].append(edge.event)
        return adjacency


def _ids(names: Iterable[str], prefix: str) -> dict[str, str]:
    ids: dict[str, str] = {}
    used: set[str] = set()
    for name in names:
        base = prefix + re.sub(r"[^A-Za-z0-9_]", "_", name)
        candidate, n = base, 1
        while candidate in used:
            n += 1
            candidate = f"{base}_{n}"
        used.add(candidate)
        ids[name] = candidate
    return ids


def to_mermaid(graph: EventGraph) -> str:
    """A Mermaid ``flowchart LR``: events as stadiums, handlers as boxes grouped
    by service, failure edges dashed and red."""
    events = _ids(graph.events, "e_")
    handlers = _ids([route.group for route in graph.routes], "h_")
    failures = graph.failure_events
    lines = ["flowchart LR"]
    for event, node in events.items():
        lines.append(f'    {node}(["{event}"])')
    services: dict[str, list[Route]] = {}
    for route in graph.routes:
        services.setdefault(route.service, []).append(route)
    for service, routes in services.items():
        lines.append(f'    subgraph {_ids([service], "s_")[service]}["{service}"]')
        for route in routes:
            lines.append(f'        {handlers[route.group]}["{route.name}"]')
        lines.append("    end")
    links: list[str] = []
    failure_links: list[int] = []
    for route in graph.routes:
        links.append(f"    {events[route.event]} --> {handlers[route.group]}")
    for edge in graph.emitted:
        if edge.kind == FAILURE:
            failure_links.append(len(links))
            links.append(f"    {handlers[edge.group]} -. failure .-> {events[edge.event]}")
        else:
            links.append(f"    {handlers[edge.group]} --> {events[edge.event]}")
    lines += links
    lines.append("    classDef event fill:#eef6ff,stroke:#3b82f6")
    lines.append("    classDef failure fill:#fee2e2,stroke:#dc2626,color:#7f1d1d")
    lines.append("    classDef handler fill:#f8fafc,stroke:#475569")
    plain = [node for event, node in events.items() if event not in failures]
    failed = [node for event, node in events.items() if event in failures]
    if plain:
        lines.append(f"    class {','.join(plain)} event")
    if failed:
        lines.append(f"    class {','.join(failed)} failure")
    if handlers:
        lines.append(f"    class {','.join(handlers.values())} handler")
    if failure_links:
        lines.append(f"    linkStyle {','.join(map(str, failure_links))} stroke:#dc2626,stroke-dasharray:5 5")
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_dot(graph: EventGraph) -> str:
    """A Graphviz digraph: events as ellipses, handlers as boxes in one cluster
    per service, failure edges dashed and red."""
    failures = graph.failure_events
    lines = ["digraph choreo {", "    rankdir=LR;", '    node [fontname="Helvetica"];']
    for event in graph.events:
        style = ', style=filled, fillcolor="#fee2e2", color="#dc2626"' if event in failures else ""
        lines.append(f"    {_quote('event:' + event)} [label={_quote(event)}, shape=ellipse{style}];")
    services: dict[str, list[Route]] = {}
    for route in graph.routes:
        services.setdefault(route.service, []).append(route)
    for index, (service, routes) in enumerate(services.items()):
        lines.append(f"    subgraph cluster_{index} {{")
        lines.append(f"        label={_quote(service)};")
        for route in routes:
            lines.append(f"        {_quote('handler:' + route.group)} [label={_quote(route.name)}, shape=box];")
        lines.append("    }")
    for route in graph.routes:
        lines.append(f"    {_quote('event:' + route.event)} -> {_quote('handler:' + route.group)};")
    for edge in graph.emitted:
        attrs_ = ' [style=dashed, color="#dc2626", label="failure"]' if edge.kind == FAILURE else ""
        lines.append(f"    {_quote('handler:' + edge.group)} -> {_quote('event:' + edge.event)}{attrs_};")
    lines.append("}")
    return "\n".join(lines) + "\n"
