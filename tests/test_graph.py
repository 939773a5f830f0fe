"""``choreo graph`` and ``choreo check``: the event flow of a whole system."""

from __future__ import annotations

import re

from typer.testing import CliRunner

from choreo.checks import check
from choreo.cli import app
from choreo.demo import build_order_apps
from choreo.graph import EventGraph, to_dot, to_mermaid
from tests.apps import systems

runner = CliRunner()

_NODE = re.compile(r'^(?P<id>[A-Za-z_][A-Za-z0-9_]*)(\(\[|\[\[|\[|\()"[^"]*"(\]\)|\]\]|\]|\))$')
_LINK = re.compile(r'^(?P<a>[A-Za-z_][A-Za-z0-9_]*) (-->|-\. [^.]+ \.->|-- "[^"]*" -->|-\. "[^"]*" \.->) '
                   r'(?P<b>[A-Za-z_][A-Za-z0-9_]*)$')


def parse_mermaid(text: str) -> tuple[set[str], list[tuple[str, str, str]], list[str]]:
    """A structural parse of the flowchart subset choreo writes: returns node
    ids, links and the directives; raises AssertionError on anything else."""
    lines = [line.strip() for line in text.strip().splitlines()]
    assert re.match(r"^flowchart (LR|TD)$", lines[0]), lines[0]
    nodes: set[str] = set()
    links: list[tuple[str, str, str]] = []
    directives: list[str] = []
    depth = 0
    for line in lines[1:]:
        if line.startswith("subgraph "):
            assert re.match(r'^subgraph [A-Za-z_][A-Za-z0-9_]*\["[^"]+"\]$', line), line
            depth += 1
        elif line == "end":
            depth -= 1
            assert depth >= 0
        elif line.startswith(("classDef ", "class ", "linkStyle ")):
            directives.append(line)
        elif (node := _NODE.match(line)) is not None:
            assert node["id"] not in nodes, f"node {node['id']} defined twice"
            nodes.add(node["id"])
        elif (link := _LINK.match(line)) is not None:
            links.append((link["a"], link["b"], line))
        else:
            raise AssertionError(f"not a line of a Mermaid flowchart: {line!r}")
    assert depth == 0, "unbalanced subgraph/end"
    for a, b, line in links:
        assert a in nodes and b in nodes, f"link to an undefined node: {line}"
    for directive in directives:
        if directive.startswith("linkStyle "):
            indexes = directive.split()[1].split(",")
            assert all(0 <= int(i) < len(links) for i in indexes), directive
        if directive.startswith("class "):
            assert set(directive.split()[1].split(",")) <= nodes, directive
    return nodes, links, directives


def test_graph_output_parses_as_mermaid_with_failure_edges_styled_apart() -> None:
    result = runner.invoke(app, ["graph", "tests.apps.systems:broken"])
    assert result.exit_code == 0, result.output
    nodes, links, directives = parse_mermaid(result.stdout)
    assert {"e_order_placed", "e_shipping_failed", "h_shipping_service_schedule_shipping"} <= nodes
    failure_links = [i for i, (_, _, line) in enumerate(links) if "failure" in line]
    assert len(failure_links) == 3  # order.refused, payment.declined, shipping.failed
    [style] = [d for d in directives if d.startswith("linkStyle")]
    assert style.split()[1] == ",".join(map(str, failure_links))
    assert any(d.startswith("class ") and "e_shipping_failed" in d and d.endswith(" failure") for d in directives)


def test_graph_of_the_demo_links_every_event_to_its_handlers() -> None:
    graph = EventGraph.from_apps(build_order_apps())
    _, links, _ = parse_mermaid(to_mermaid(graph))
    pairs = {(a, b) for a, b, _ in links}
    assert ("e_order_created", "h_inventory_service_reserve_inventory") in pairs
    assert ("h_payment_service_charge_card", "e_payment_failed") in pairs
    assert len(links) == len(graph.routes) + len(graph.emitted)


def test_dot_format_is_a_digraph_with_dashed_failure_edges() -> None:
    result = runner.invoke(app, ["graph", "tests.apps.systems:clean", "--format", "dot"])
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert text.startswith("digraph choreo {") and text.rstrip().endswith("}")
    assert text.count("{") == text.count("}")
    assert '"handler:order_service.confirm_order" -> "event:order.refused" [style=dashed' in text
    assert '"event:order.placed" -> "handler:order_service.confirm_order";' in text
    assert to_dot(EventGraph.from_apps(systems.clean)) == text


def test_check_passes_on_a_clean_system() -> None:
    result = runner.invoke(app, ["check", "tests.apps.systems:clean"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("ok: 4 handlers")


def test_check_fails_on_an_unhandled_failure_event() -> None:
    result = runner.invoke(app, ["check", "tests.apps.systems:broken"])
    assert result.exit_code == 1
    assert "unhandled-failure: failure event 'shipping.failed'" in result.stdout
    assert "shipping_service.schedule_shipping" in result.stdout


def test_declaring_a_failure_event_terminal_accepts_dropping_it() -> None:
    result = runner.invoke(app, ["check", "tests.apps.systems:broken", "--entry", "order.placed",
                                 "--terminal", "shipping.failed", "--terminal", "shipping.scheduled",
                                 "--terminal", "order.cancelled"])
    assert result.exit_code == 0, result.output


def test_strict_check_reports_undeclared_entries_and_dead_ends() -> None:
    report = check(EventGraph.from_apps(systems.clean), strict=True)
    kinds = {(f.kind, f.event) for f in report.findings}
    assert kinds == {("unproduced", "order.placed"), ("unconsumed", "payment.captured"),
                     ("unconsumed", "order.cancelled")}


def test_check_reports_handlers_waiting_for_events_nothing_emits() -> None:
    from choreo import App

    typo = App("typo_service")

    @typo.on_event("order.plcaed")
    async def on_typo(data: dict[str, object]) -> None:
        return None

    report = check(EventGraph.from_apps([*systems.clean, typo]))
    assert [(f.kind, f.event) for f in report.findings] == [("unproduced", "order.placed"),
                                                            ("unproduced", "order.plcaed")]
    report = check(EventGraph.from_apps([*systems.clean, typo]), entry=["order.placed"])
    assert [(f.kind, f.event) for f in report.findings] == [("unproduced", "order.plcaed")]


def test_check_finds_cycles() -> None:
    from choreo import App

    loop = App("loop_service")

    @loop.on_event("ping")
    @loop.emits("pong")
    async def ping(data: dict[str, object]) -> None:
        return None

    @loop.on_event("pong")
    @loop.emits("ping")
    async def pong(data: dict[str, object]) -> None:
        return None

    report = check(EventGraph.from_apps([loop]), entry=["ping"])
    assert [str(f) for f in report.findings] == ["cycle: events loop: ping -> pong -> ping"]
    result = runner.invoke(app, ["check", "tests.apps.systems:clean", "--entry", "nope"])
    assert result.exit_code == 1
    assert "declared event 'nope' appears nowhere" in result.stdout


def test_routes_lists_the_table() -> None:
    result = runner.invoke(app, ["routes", "tests.apps.systems:broken"])
    assert result.exit_code == 0, result.output
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["EVENT", "SERVICE", "HANDLER", "EMITS", "GROUP", "OPTIONS"]
    assert any(row.split()[:3] == ["payment.captured", "shipping_service", "schedule_shipping"] for row in rows)
    as_json = runner.invoke(app, ["routes", "tests.apps.systems:clean", "--json"])
    assert '"group": "payment_service.capture_payment"' in as_json.stdout


def test_a_missing_target_is_one_line_and_exit_2() -> None:
    for command in ("routes", "graph", "check"):
        result = runner.invoke(app, [command, "tests.apps.systems:nothing"])
        assert result.exit_code == 2
        assert result.stderr == (
            "error: 'tests.apps.systems:nothing': module 'tests.apps.systems' has no attribute 'nothing'\n"
        )
