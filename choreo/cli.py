"""The ``choreo`` command: a thin adapter from arguments to library calls.

Every command takes ``--broker`` (or ``CHOREO_BROKER_URL``). Errors are one
line on stderr and a non-zero exit: 2 for bad arguments or configuration, 1
for everything else (an unreachable broker, findings of ``check``...).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from typing import Annotated, Any

import typer

from brokers import BrokerError
from choreo.errors import ChoreoError, ConfigurationError, DecodeError

app = typer.Typer(
    name="choreo",
    help="Sagas and choreography over events.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
dlq_app = typer.Typer(help="Inspect, replay and purge dead letters.", no_args_is_help=True)
saga_app = typer.Typer(help="Inspect and resume sagas.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")
app.add_typer(saga_app, name="saga")

BrokerOption = Annotated[
    str | None,
    typer.Option("--broker", "-b", envvar="CHOREO_BROKER_URL", help="Broker URL (memory://, redis://, rediss://)."),
]
TargetsArgument = Annotated[list[str], typer.Argument(help="Apps, as module:app (or module, if it holds one App).")]


class LogFormat(enum.StrEnum):
    text = "text"
    json = "json"


class LogLevel(enum.StrEnum):
    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


class GraphFormat(enum.StrEnum):
    mermaid = "mermaid"
    dot = "dot"


class TraceFormat(enum.StrEnum):
    tree = "tree"
    mermaid = "mermaid"


def fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@contextlib.contextmanager
def errors() -> Iterator[None]:
    """Turn library errors into one line on stderr and an exit code, never a traceback."""
    try:
        yield
    except (ConfigurationError, DecodeError) as exc:
        raise fail(str(exc), 2) from None
    except (ChoreoError, BrokerError) as exc:
        raise fail(str(exc), 1) from None
    except TimeoutError as exc:
        raise fail(str(exc) or "timed out", 1) from None
    except OSError as exc:
        raise fail(f"{exc.strerror or exc}", 1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def _load(targets: Sequence[str]) -> list[Any]:
    from choreo.loader import load_apps

    return load_apps(list(targets))


# -- running -------------------------------------------------------------------


@app.command()
def worker(
    targets: TargetsArgument,
    broker: BrokerOption = None,
    concurrency: Annotated[int, typer.Option(help="Handlers running at once, per process.")] = 64,
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
) -> None:
    """Run apps until SIGINT/SIGTERM, then drain in-flight handlers and exit 0."""
    from choreo.logs import configure_logging
    from choreo.supervisor import WorkerOptions, run_worker, supervise

    if workers < 1:
        raise fail("--workers must be at least 1")
    if concurrency < 1:
        raise fail("--concurrency must be at least 1")
    configure_logging(log_level.value, log_format.value)
    options = WorkerOptions(
        targets=tuple(targets), broker=broker, concurrency=concurrency, grace=grace, metrics_port=metrics_port,
        metrics_host=metrics_host, log_level=log_level.value, log_format=log_format.value,
        health_interval=health_interval,
    )
    with errors():
        if workers == 1:
            run_worker(options)
            return
        code = supervise(options, workers)
    if code:
        raise typer.Exit(code)


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


def _table(rows: list[dict[str, str]], columns: Sequence[str]) -> str:
    widths = {c: max([len(c), *(len(r[c]) for r in rows)]) for c in columns}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip()]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in columns).rstrip() for r in rows]
    return "\n".join(lines)


@app.command()
def routes(
    targets: TargetsArgument,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per route.")] = False,
) -> None:
    """Show the routing table: event, service, handler, emits, group."""
    from choreo.admin import route_rows

    with errors():
        rows = route_rows(_load(targets))
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row))
        return
    typer.echo(_table(rows, ("event", "service", "handler", "emits", "group", "options")))


@app.command()
def graph(
    targets: TargetsArgument,
    format: Annotated[GraphFormat, typer.Option("--format", "-f", help="mermaid or dot.")] = GraphFormat.mermaid,
    output: Annotated[str | None, typer.Option("--output", "-o", help="Write to this file.")] = None,
) -> None:
    """Draw the event flow across all given apps (failure edges dashed, in red)."""
    from choreo.graph import EventGraph, to_dot, to_mermaid

    with errors():
        event_graph = EventGraph.from_apps(_load(targets))
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
) -> None:
    """Check the whole system's event flow; exit 1 if anything is found.

    Finds failure events nobody handles, events emitted that no handler takes,
    handlers waiting for events nothing emits, and cycles.
    """
    from choreo.checks import check as run_check
    from choreo.graph import EventGraph

    with errors():
        event_graph = EventGraph.from_apps(_load(targets))
        report = run_check(event_graph, entry=entry or (), terminal=terminal or (), strict=strict)
    for finding in report.findings:
        typer.echo(str(finding))
    summary = f"{len(event_graph.routes)} handlers, {len(event_graph.events)} events"
    if report.inferred:
        summary += f"; taken as entry/terminal: {', '.join(report.inferred)}"
    if report.findings:
        typer.echo(f"{len(report.findings)} finding(s) in {summary}", err=True)
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
        apps = _load(app_targets or [])
        result = asyncio.run(collect(broker, correlation_id, apps=apps))
        if not result.events:
            raise ChoreoError(f"no events with correlation id {correlation_id!r} on {result.broker_url}")
    typer.echo(render_tree(result) if format is TraceFormat.tree else render_mermaid(result), nl=False)


# -- sagas -------------------------------------------------------------------------


def _duration(step: Any) -> str:
    if step.started_at is None or step.finished_at is None:
        return "-"
    return f"{(step.finished_at - step.started_at).total_seconds():.3f}s"


def _saga_row(result: Any) -> dict[str, str]:
    done = sum(1 for s in result.steps if s.status == "succeeded")
    error = result.error or {}
    return {"saga_id": result.saga_id, "name": result.name, "state": result.state.value,
            "steps": f"{done}/{len(result.steps)}", "error": str(error.get("message", "")) or "-"}


@saga_app.command("list")
def saga_list(
    targets: Annotated[list[str] | None, typer.Argument(help="Apps with the saga definitions (optional).")] = None,
    state: Annotated[str | None, typer.Option(help="Only sagas in this state (e.g. failed).")] = None,
    broker: BrokerOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per saga.")] = False,
) -> None:
    """List stored sagas, oldest first (``--state failed``: those a person must look at)."""
    from choreo import admin

    async def go() -> list[Any]:
        async with admin.connected(broker) as instance:
            return await admin.list_sagas(instance, state, apps=apps)

    with errors():
        apps = _load(targets or [])
        results = asyncio.run(go())
    rows = [_saga_row(r) for r in results]
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row))
    elif not rows:
        typer.echo("no sagas" + (f" in state {state}" if state else ""))
    else:
        typer.echo(_table(rows, ("saga_id", "name", "state", "steps", "error")))


@saga_app.command("status")
def saga_status(
    saga_id: Annotated[str, typer.Argument(metavar="ID")],
    targets: Annotated[list[str] | None, typer.Argument(help="Apps with the saga definitions (step names).")] = None,
    broker: BrokerOption = None,
) -> None:
    """Show one saga: state, error, and each step's status, attempts and timings."""
    from choreo import admin

    async def go() -> Any:
        async with admin.connected(broker) as instance:
            return await admin.saga_status(instance, saga_id, apps=apps)

    with errors():
        apps = _load(targets or [])
        result = asyncio.run(go())
    typer.echo(f"saga:   {result.saga_id}\nname:   {result.name}\nstate:  {result.state.value}")
    if result.error:
        where = f" (step {result.error['step']})" if result.error.get("step") else ""
        typer.echo(f"error:  {result.error.get('type', '')}: {result.error.get('message', '')}{where}")
    rows = [
        {"step": step.name, "status": str(step.status), "attempts": str(step.attempts),
         "started": step.started_at.strftime("%H:%M:%S.%f")[:-3] if step.started_at else "-",
         "duration": _duration(step),
         "error": (step.error or {}).get("message", "-") if step.error else "-"}
        for step in result.steps
    ]
    typer.echo(_table(rows, ("step", "status", "attempts", "started", "duration", "error")))


@saga_app.command("resume")
def saga_resume(
    saga_id: Annotated[str, typer.Argument(metavar="ID")],
    targets: Annotated[list[str], typer.Argument(help="The app holding the SagaCoordinator (and participants).")],
    broker: BrokerOption = None,
    wait: Annotated[bool, typer.Option(help="Run the given apps until the saga ends.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait with --wait.")] = 60.0,
) -> None:
    """Continue a saga from its stored state (e.g. a FAILED one after its cause was fixed)."""
    from choreo import admin

    with errors():
        apps = _load(targets)
        result = asyncio.run(admin.resume_saga(broker, saga_id, apps, wait=wait, timeout=timeout if wait else None))
    typer.echo(f"saga {result.saga_id} resumed: {result.state.value}")


# -- dead letters ----------------------------------------------------------------


@dlq_app.command("list")
def dlq_list(
    broker: BrokerOption = None,
    limit: Annotated[int, typer.Option(help="Most dead letters shown, oldest first.")] = 1000,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per dead letter.")] = False,
) -> None:
    """List dead letters: id, event, group, attempts and reason."""
    from choreo import admin

    async def go() -> list[Any]:
        async with admin.connected(broker) as instance:
            return await admin.dead_letters(instance, limit)

    with errors():
        letters = asyncio.run(go())
    rows = [
        {"id": d.id, "topic": d.topic, "group": d.group or "-", "attempts": str(d.attempts),
         "event_id": d.event.id if d.event else "-", "reason": d.reason}
        for d in letters
    ]
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row))
        return
    if not rows:
        typer.echo("no dead letters")
        return
    for row in rows:
        if len(row["reason"]) > 100:
            row["reason"] = row["reason"][:97] + "..."
    typer.echo(_table(rows, ("id", "topic", "group", "attempts", "event_id", "reason")))


@dlq_app.command("show")
def dlq_show(dead_letter_id: Annotated[str, typer.Argument(metavar="ID")], broker: BrokerOption = None) -> None:
    """Show one dead letter in full: reason, ids and the event."""
    from choreo import admin

    async def go() -> Any:
        async with admin.connected(broker) as instance:
            return await admin.find_dead_letter(instance, dead_letter_id)

    with errors():
        letter = asyncio.run(go())
    typer.echo(f"id:        {letter.id}\ntopic:     {letter.topic}\ngroup:     {letter.group or '-'}")
    typer.echo(f"attempts:  {letter.attempts}\nreason:    {letter.reason}")
    if letter.event is None:
        typer.echo(f"raw:       {letter.raw[:2000]!r}")
        return
    event = letter.event
    typer.echo(f"event:     {event.type} {event.id}\ncorrelation_id: {event.correlation_id}")
    if event.saga_id:
        typer.echo(f"saga_id:   {event.saga_id}")
    typer.echo("data:\n" + json.dumps(event.data, indent=2, ensure_ascii=False))


@dlq_app.command("replay")
def dlq_replay(
    ids: Annotated[list[str] | None, typer.Argument(metavar="[ID]...", help="Dead letters to replay.")] = None,
    replay_all: Annotated[bool, typer.Option("--all", help="Replay every dead letter.")] = False,
    broker: BrokerOption = None,
) -> None:
    """Send dead letters back to the handler that gave up on them (once its cause is fixed)."""
    from choreo import admin

    if bool(ids) == replay_all:
        raise fail("give dead letter ids or --all (not both)")
    show_progress = replay_all and sys.stderr.isatty()

    async def go() -> tuple[int, list[str]]:
        async with admin.connected(broker) as instance:
            done = [0]

            def progress(item: Any, replayed: bool) -> None:
                done[0] += 1
                if show_progress:
                    typer.echo(f"\rreplayed {done[0]}", err=True, nl=False)
                elif replay_all and done[0] % 100 == 0:
                    typer.echo(f"replayed {done[0]}...", err=True)

            result = await admin.replay_dead_letters(instance, None if replay_all else ids, progress=progress)
            if show_progress:
                typer.echo("", err=True)
            return result

    with errors():
        replayed, missing = asyncio.run(go())
    typer.echo(f"replayed {replayed} dead letter(s)")
    if missing:
        raise fail(f"no dead letter with id {', '.join(missing)}", 1)


@dlq_app.command("purge")
def dlq_purge(
    ids: Annotated[list[str] | None, typer.Argument(metavar="[ID]...", help="Dead letters to delete.")] = None,
    purge_all: Annotated[bool, typer.Option("--all", help="Delete every dead letter (also with no ids).")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    broker: BrokerOption = None,
) -> None:
    """Delete dead letters for good (all of them when no ids are given)."""
    from choreo import admin

    if ids and purge_all:
        raise fail("give dead letter ids or --all (not both)")
    if not ids and not yes and sys.stdin.isatty() and not typer.confirm("Delete every dead letter?"):
        raise typer.Exit(1)

    async def go() -> int:
        async with admin.connected(broker) as instance:
            return await admin.purge_dead_letters(instance, ids or None)

    with errors():
        count = asyncio.run(go())
    typer.echo(f"purged {count} dead letter(s)")


def main() -> None:
    app()
