"""The ``choreo`` command: a thin adapter from arguments to library calls.

Every command takes ``--broker`` (or ``CHOREO_BROKER_URL``). Errors are one
line on stderr and a non-zero exit: 2 for bad arguments or configuration, 1
for everything else (an unreachable broker, findings of ``check``...).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer

from choreo.cli_admin import dlq_app, groups_app, saga_app
from choreo.cli_db import db_app
from choreo.cli_support import (
    BrokerOption,
    DatabaseOption,
    GraphFormat,
    LogFormat,
    LogLevel,
    TargetsArgument,
    TraceFormat,
    errors,
    fail,
    load_targets,
    render_table,
)
from choreo.errors import ChoreoError
from choreo.options import DEFAULT_CONCURRENCY, RuntimeOptions
from choreo.supervisor import WORKER_GC_THRESHOLD

if TYPE_CHECKING:
    from choreo.app import App
    from choreo.middleware import Middleware

app = typer.Typer(
    name="choreo",
    help="Sagas and choreography over events.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(dlq_app, name="dlq")
app.add_typer(saga_app, name="saga")
app.add_typer(groups_app, name="groups")
app.add_typer(db_app, name="db")

# -- running -------------------------------------------------------------------


@app.command()
def worker(
    targets: TargetsArgument,
    broker: BrokerOption = None,
    database: DatabaseOption = None,
    concurrency: Annotated[int, typer.Option(help="Handlers running at once, per process.")] = DEFAULT_CONCURRENCY,
    workers: Annotated[int, typer.Option(help="Worker processes; the parent forwards SIGTERM to each.")] = 1,
    grace: Annotated[float, typer.Option(help="Seconds to drain in-flight handlers on shutdown.")] = 10.0,
    metrics_port: Annotated[
        int | None, typer.Option(help="Serve Prometheus metrics on this port (one scrape for all processes).")
    ] = None,
    metrics_host: Annotated[str, typer.Option(help="Address the metrics endpoint binds.")] = "127.0.0.1",
    log_level: Annotated[LogLevel, typer.Option(case_sensitive=False, help="Lowest level logged.")] = LogLevel.INFO,
    log_format: Annotated[LogFormat, typer.Option(help="text, or json (one object per line).")] = LogFormat.text,
    health_interval: Annotated[
        float, typer.Option(help="Seconds between consumer backlog readings for the metrics.")
    ] = 5.0,
    gc_threshold: Annotated[
        int, typer.Option(help="First threshold of Python's garbage collector; 0 leaves Python's default (700).")
    ] = WORKER_GC_THRESHOLD,
    otel: Annotated[
        bool, typer.Option("--otel", help="Trace with OpenTelemetry (global tracer provider); needs choreo-saga[otel].")
    ] = False,
) -> None:
    """Run apps until SIGINT/SIGTERM, then drain in-flight handlers and exit: 0 after a
    clean drain, 3 if handlers still running after --grace were cancelled (their
    events are redelivered), 2 on a configuration error, 1 on any other failure."""
    from choreo.logs import configure_logging
    from choreo.supervisor import WorkerOptions, run_worker, supervise

    if workers < 1:
        raise fail("--workers must be at least 1")
    with errors():
        runtime = RuntimeOptions(
            concurrency=concurrency, grace=grace, middleware=_tracing() if otel else (), database=database
        )
    configure_logging(log_level.value, log_format.value)
    options = WorkerOptions(
        targets=tuple(targets), broker=broker, runtime=runtime, metrics_port=metrics_port,
        metrics_host=metrics_host, log_level=log_level.value, log_format=log_format.value,
        health_interval=health_interval, gc_threshold=gc_threshold, otel=otel,
    )
    with errors():
        code = run_worker(options) if workers == 1 else supervise(options, workers)
    if code:
        raise typer.Exit(code)


def _tracing() -> tuple[Middleware, ...]:
    try:
        from choreo.otel import TracingMiddleware
    except ImportError:
        raise fail("--otel needs OpenTelemetry: pip install 'choreo-saga[otel]'") from None
    return (TracingMiddleware(),)


@app.command()
def publish(
    event_type: Annotated[str, typer.Argument(metavar="TYPE", help="Event type, e.g. order.created.")],
    data: Annotated[str, typer.Argument(metavar="JSON", help="The payload, a JSON object.")] = "{}",
    broker: BrokerOption = None,
    correlation_id: Annotated[str | None, typer.Option(help="Join an existing transaction.")] = None,
    saga_id: Annotated[str | None, typer.Option(help="The saga this event belongs to.")] = None,
    event_id: Annotated[str | None, typer.Option("--id", help="Producer id (consumers dedupe on it).")] = None,
    delay: Annotated[float | None, typer.Option(help="Seconds until it is delivered.")] = None,
) -> None:
    """Publish one event; prints its id and correlation id."""
    from choreo import admin
    from choreo.worker import broker_url_from_env

    with errors():
        payload = admin.parse_json_object(data)
        if broker_url_from_env(broker).startswith("memory:"):
            typer.echo("warning: memory:// lives in this process; no worker will see this event", err=True)
        event = asyncio.run(
            admin.publish(broker, event_type, payload, delay=delay, id=event_id, correlation_id=correlation_id,
                          saga_id=saga_id)
        )
    typer.echo(f"published {event.type} id={event.id} correlation_id={event.correlation_id}")


@app.command()
def demo(broker: BrokerOption = None) -> None:
    """Run the order choreography demo (in memory unless --broker is given)."""
    from choreo.demo import run_demo

    # Retries and failures show inline with the flow.
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="    ! %(message)s")
    with errors():
        asyncio.run(run_demo(broker or "memory://", out=typer.echo))


# -- looking at the system -------------------------------------------------------


@app.command()
def routes(
    targets: TargetsArgument,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per route.")] = False,
) -> None:
    """Show the routing table: event, service, handler, emits, group."""
    from choreo.admin import route_rows

    with errors():
        rows = route_rows(load_targets(targets))
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row))
        return
    typer.echo(render_table(rows, ("event", "service", "handler", "emits", "group", "options")))


@app.command()
def graph(
    targets: TargetsArgument,
    format: Annotated[GraphFormat, typer.Option("--format", "-f", help="mermaid or dot.")] = GraphFormat.mermaid,
    output: Annotated[str | None, typer.Option("--output", "-o", help="Write to this file.")] = None,
) -> None:
    """Draw the event flow across all given apps (failure edges dashed, in red)."""
    from choreo.graph import EventGraph, to_dot, to_mermaid

    with errors():
        event_graph = EventGraph.from_apps(load_targets(targets))
        text = to_mermaid(event_graph) if format is GraphFormat.mermaid else to_dot(event_graph)
        if output:
            with open(output, "w") as file:
                file.write(text)
            return
    typer.echo(text, nl=False)


@app.command()
def check(
    targets: TargetsArgument,
    entry: Annotated[list[str] | None, typer.Option(help="An event published from outside (repeatable).")] = None,
    terminal: Annotated[list[str] | None, typer.Option(help="An event that ends a flow (repeatable).")] = None,
    strict: Annotated[bool, typer.Option(help="Infer no entry or terminal events: declare them all.")] = False,
    broker: Annotated[
        str | None,
        typer.Option("--broker", "-b", help="Also fail on sagas stored there in flight on versions no target defines."),
    ] = None,
    database: Annotated[
        str | None,
        typer.Option("--database", envvar="CHOREO_DATABASE_URL",
                     help="The same for sagas kept in this PostgreSQL database (postgresql://...)."),
    ] = None,
) -> None:
    """Check the whole system's event flow; exit 1 if anything is found.

    Finds failure events nobody handles, events emitted that no handler takes,
    handlers waiting for events nothing emits, and cycles. With ``--broker``,
    also sagas in flight on a version the targets no longer define (a deploy
    gate: shipping the targets would strand them); with ``--database`` (or
    CHOREO_DATABASE_URL), the same for sagas kept in PostgreSQL.
    """
    from choreo import admin
    from choreo.checks import check as run_check
    from choreo.checks import stranded_in, stranded_sagas
    from choreo.graph import EventGraph

    async def stranded(apps: list[App]) -> list[Any]:
        found: list[Any] = []
        if broker is not None:
            async with admin.connected(broker) as instance:
                found.extend(await stranded_sagas(instance, apps))
        if database is not None:
            async with admin.database_sagas(database) as sagas:
                found.extend(await stranded_in(sagas, apps))
        return found

    with errors():
        apps = load_targets(targets)
        event_graph = EventGraph.from_apps(apps)
        report = run_check(event_graph, entry=entry or (), terminal=terminal or (), strict=strict)
        strands = asyncio.run(stranded(apps)) if broker is not None or database is not None else []
    for finding in report.findings:
        typer.echo(str(finding))
    for saga in strands:
        typer.echo(str(saga))
    if strands:
        typer.echo(f"{len(strands)} saga(s) in flight on versions no target defines", err=True)
    summary = f"{len(event_graph.routes)} handlers, {len(event_graph.events)} events"
    if report.inferred:
        summary += f"; taken as entry/terminal: {', '.join(report.inferred)}"
    if report.findings:
        typer.echo(f"{len(report.findings)} finding(s) in {summary}", err=True)
    if report.findings or strands:
        raise typer.Exit(1)
    typer.echo(f"ok: {summary}")


@app.command()
def trace(
    correlation_id: Annotated[str, typer.Argument(help="The correlation id of one business transaction.")],
    broker: BrokerOption = None,
    format: Annotated[TraceFormat, typer.Option("--format", "-f", help="tree or mermaid.")] = TraceFormat.tree,
    app_targets: Annotated[
        list[str] | None, typer.Option("--app", help="Apps (module:app) to name the handlers that emitted events.")
    ] = None,
) -> None:
    """Rebuild one transaction from the streams: its events in causal order,
    the handlers that took each and their outcome."""
    from choreo.trace import collect, render_mermaid, render_tree

    with errors():
        apps = load_targets(app_targets or [])
        result = asyncio.run(collect(broker, correlation_id, apps=apps))
        if not result.events:
            raise ChoreoError(f"no events with correlation id {correlation_id!r} on {result.broker_url}")
    typer.echo(render_tree(result) if format is TraceFormat.tree else render_mermaid(result), nl=False)


@app.command()
def dashboard(
    targets: Annotated[
        list[str] | None, typer.Argument(help="Apps (module:app) whose routes draw /flow and name saga steps.")
    ] = None,
    broker: BrokerOption = None,
    database: Annotated[
        str | None, typer.Option(help="Read sagas from this PostgreSQL state store instead of the broker.")
    ] = None,
    host: Annotated[str, typer.Option(help="Address to bind (loopback by default: no one else can reach it).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="Port to bind (0: any free port).")] = 8600,
    allow_actions: Annotated[
        bool, typer.Option("--allow-actions", help="Allow replaying and purging dead letters from the pages.")
    ] = False,
) -> None:
    """Serve the web dashboard: sagas, one saga's timeline, transactions, dead
    letters and the live event flow, with the same data as JSON under /api/.
    Needs choreo-saga[dashboard]."""
    from choreo.worker import broker_url_from_env

    try:
        from choreo.dashboard import run as run_dashboard
    except ImportError:
        raise fail("the dashboard needs its extra: pip install 'choreo-saga[dashboard]'") from None
    with errors():
        apps = load_targets(targets or [])
        url = broker_url_from_env(broker)
        if url.startswith("memory:"):
            typer.echo("warning: memory:// lives in this process; the dashboard sees only its own empty broker",
                       err=True)
        asyncio.run(run_dashboard(url, apps=apps, database=database, host=host, port=port,
                                  allow_actions=allow_actions, announce=typer.echo))


def main() -> None:
    app()
