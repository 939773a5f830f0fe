"""``choreo check``: what is missing or looping in a system's event flow.

Findings, over every given app at once:

* ``unhandled-failure``: a failure event (second in ``@emits``) nobody handles,
  so a failed step is silently dropped;
* ``unconsumed``: an event a handler emits that no handler takes;
* ``unproduced``: a handler waits for an event that nothing emits;
* ``cycle``: events that can lead back to themselves.

Entry events (published from outside) and terminal events (the end of a flow)
are declared with ``entry`` and ``terminal``. Without declarations, a single
event that nothing emits is taken as the entry, and success events nobody
handles as terminal (``strict`` turns both inferences off). Failure events are
never assumed terminal: declare them if dropping them is intended. Saga
lifecycle events (``saga.<name>.started|compensating|completed|compensated|failed``)
are terminal by nature.

With the saga state (the broker's, ``stranded_sagas``, or a store such as
PostgreSQL's, ``stranded_in``) the deploy gate is added: sagas in flight on a
version of their definition that none of the apps defines any more.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import attrs

from choreo.graph import EventGraph
from choreo.saga.topics import is_lifecycle, is_timeout

if TYPE_CHECKING:
    from brokers import Broker
    from choreo.app import App
    from choreo.saga.query import SagaQuery
    from choreo.saga.versions import Stranded

__all__ = ("CheckReport", "Finding", "check", "stranded_in", "stranded_sagas")

@attrs.frozen
class Finding:
    """One problem: its kind, the event concerned and a sentence for a person."""

    kind: str
    event: str
    message: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


@attrs.frozen
class CheckReport:
    """Findings, and the entry and terminal events the check used."""

    findings: tuple[Finding, ...]
    entries: tuple[str, ...]
    terminals: tuple[str, ...]
    inferred: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.findings


def _cycles(graph: EventGraph) -> list[list[str]]:
    """One representative cycle per strongly connected component (Tarjan)."""
    adjacency = graph.successors()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        # Iterative DFS: deep chains must not hit the recursion limit.
        work = [(node, iter(adjacency[node]))]
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        while work:
            current, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(adjacency[child])))
                    advanced = True
                    break
                if child in on_stack:
                    low[current] = min(low[current], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[current])
            if low[current] == index[current]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == current:
                        break
                if len(component) > 1 or current in adjacency[current]:
                    components.append(component)

    for node in adjacency:
        if node not in index:
            visit(node)
    cycles = []
    for component in components:
        members = set(component)
        start = min(component, key=list(adjacency).index)
        path, node = [start], start
        while True:  # walk inside the component until a node repeats
            node = next(n for n in adjacency[node] if n in members)
            if node in path:
                cycles.append([*path[path.index(node):], node])
                break
            path.append(node)
    return cycles


def check(
    graph: EventGraph,
    *,
    entry: Iterable[str] = (),
    terminal: Iterable[str] = (),
    strict: bool = False,
) -> CheckReport:
    """Look for unhandled failures, dead ends, orphans and cycles in ``graph``."""
    entries = tuple(dict.fromkeys(entry))
    terminals = tuple(dict.fromkeys(terminal))
    failures = graph.failure_events
    findings: list[Finding] = []
    inferred: list[str] = []

    unproduced = [e for e in graph.events if graph.consumers(e) and not graph.producers(e) and e not in entries]
    if not entries and not strict and len(unproduced) == 1:
        inferred.append(unproduced.pop())
    for event in unproduced:
        handlers = ", ".join(route.group for route in graph.consumers(event))
        findings.append(Finding(
            "unproduced", event,
            f"{handlers} waits for {event!r}, which no handler emits (declare it as an entry event if it is published "
            "from outside)",
        ))

    infer_terminals = not terminals and not strict
    for event in graph.events:
        if graph.consumers(event) or not graph.producers(event) or event in terminals or is_lifecycle(event):
            continue
        producers = ", ".join(edge.group for edge in graph.producers(event))
        if event in failures:
            findings.append(Finding(
                "unhandled-failure", event,
                f"failure event {event!r} (emitted by {producers}) has no handler: failures there are dropped",
            ))
        elif infer_terminals:
            inferred.append(event)
        else:
            findings.append(Finding(
                "unconsumed", event, f"{event!r} (emitted by {producers}) has no handler and is not declared terminal"
            ))

    for cycle in _cycles(graph):
        if len(cycle) == 2 and is_timeout(cycle[0]):
            continue  # a saga's timer handler arms the next timer: a clock, not a loop
        findings.append(Finding("cycle", cycle[0], "events loop: " + " -> ".join(cycle)))

    for event in (*entries, *terminals):
        if event not in graph.events:
            findings.append(Finding("unknown", event, f"declared event {event!r} appears nowhere in the system"))
    return CheckReport(tuple(findings), entries, terminals, tuple(inferred))



async def stranded_sagas(broker: Broker, apps: Sequence[App]) -> list[Stranded]:
    """Sagas stored on ``broker`` and still in flight on a ``(name, version)``
    that no coordinator of ``apps`` defines: shipping ``apps`` would leave
    them waiting. Pass every app that coordinates sagas on this broker.
    """
    from choreo.saga.coordinator import coordinator_of
    from choreo.saga.store import list_records
    from choreo.saga.versions import stranded

    prefixes = {"saga:"}
    for app in apps:
        coordinator = coordinator_of(app)
        if coordinator is not None:
            prefixes.add(coordinator.key_prefix)
    defined = _defined(apps)
    found: list[Stranded] = []
    for prefix in sorted(prefixes):
        found.extend(stranded(await list_records(broker, prefix), defined))
    return found


async def stranded_in(sagas: SagaQuery, apps: Sequence[App]) -> list[Stranded]:
    """Sagas that ``sagas`` holds (a ``PostgresStateStore``, open) and still
    in flight on a ``(name, version)`` that no coordinator of ``apps``
    defines: the deploy gate of ``stranded_sagas`` for state kept outside
    the broker. Only running, pending and compensating sagas are read, a
    page at a time, through the store's index on state.
    """
    from choreo.saga.definition import SagaState
    from choreo.saga.stores import all_records
    from choreo.saga.versions import stranded

    defined = _defined(apps)
    found: list[Stranded] = []
    for state in SagaState:
        if not state.terminal:
            found.extend(stranded(await all_records(sagas, state), defined))
    return found


def _defined(apps: Sequence[App]) -> set[tuple[str, int]]:
    """Every ``(saga name, version)`` a coordinator of ``apps`` defines."""
    from choreo.saga.coordinator import coordinator_of

    defined: set[tuple[str, int]] = set()
    for app in apps:
        coordinator = coordinator_of(app)
        if coordinator is not None:
            defined |= coordinator.versions.defined()
    return defined
