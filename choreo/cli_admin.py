"""``choreo saga`` and ``choreo dlq``: looking after sagas and dead letters."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer

from choreo.cli_support import (
    BrokerOption,
    DatabaseOption,
    GroupStart,
    TargetsArgument,
    errors,
    fail,
    load_targets,
    render_table,
)

if TYPE_CHECKING:
    from datetime import datetime

    from choreo.saga import SagaResult

dlq_app = typer.Typer(help="Inspect, replay and purge dead letters.", no_args_is_help=True)
saga_app = typer.Typer(help="Inspect and resume sagas.", no_args_is_help=True)
groups_app = typer.Typer(help="Create consumer groups ahead of a deploy.", no_args_is_help=True)


# -- consumer groups ---------------------------------------------------------------


@groups_app.command("create")
def groups_create(
    targets: TargetsArgument,
    broker: BrokerOption = None,
    start: Annotated[
        GroupStart | None,
        typer.Option(help="Where new groups start: auto, beginning or end (default: each handler's own start)."),
    ] = None,
) -> None:
    """Create the consumer group of every handler of TARGETS, so that events
    published from now on wait for them even before their workers start.
    Existing groups keep their position."""
    from choreo import admin
    from choreo.worker import broker_url_from_env

    async def go() -> list[Any]:
        async with admin.connected(broker) as instance:
            return await admin.create_groups(instance, apps, None if start is None else start.value)

    with errors():
        apps = load_targets(targets)
        if broker_url_from_env(broker).startswith("memory:"):
            raise fail("memory:// lives in one process: groups created here would vanish; give --broker")
        created = asyncio.run(go())
    for sub in created:
        typer.echo(f"{sub.topic} -> {sub.group} (start: {sub.start})")
    typer.echo(f"{len(created)} groups ready")


# -- sagas -------------------------------------------------------------------------


def _duration(started: datetime | None, finished: datetime | None) -> str:
    if started is None or finished is None:
        return "-"
    return f"{(finished - started).total_seconds():.3f}s"


def _message(error: dict[str, Any] | None) -> str:
    return str(error.get("message", "-")) if error else "-"


def _saga_row(result: SagaResult) -> dict[str, str]:
    from choreo.saga import StepStatus

    done = sum(1 for s in result.steps if s.status == StepStatus.SUCCEEDED)
    error = result.error or {}
    return {"saga_id": result.saga_id, "name": result.name, "version": str(result.version),
            "state": result.state.value, "steps": f"{done}/{len(result.steps)}",
            "error": str(error.get("message", "")) or "-"}


@saga_app.command("list")
def saga_list(
    targets: Annotated[list[str] | None, typer.Argument(help="Apps with the saga definitions (optional).")] = None,
    state: Annotated[str | None, typer.Option(help="Only sagas in this state (e.g. failed).")] = None,
    broker: BrokerOption = None,
    database: DatabaseOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per saga.")] = False,
) -> None:
    """List stored sagas, oldest first (``--state failed``: those a person must look at).
    With --database, those kept in PostgreSQL."""
    from choreo import admin

    async def go() -> list[SagaResult]:
        if database:
            async with admin.database_sagas(database) as query:
                return await admin.query_sagas(query, state, apps=apps)
        async with admin.connected(broker) as instance:
            return await admin.list_sagas(instance, state, apps=apps)

    with errors():
        apps = load_targets(targets or [])
        results = asyncio.run(go())
    rows = [_saga_row(r) for r in results]
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row))
    elif not rows:
        typer.echo("no sagas" + (f" in state {state}" if state else ""))
    else:
        typer.echo(render_table(rows, ("saga_id", "name", "version", "state", "steps", "error")))


@saga_app.command("status")
def saga_status(
    saga_id: Annotated[str, typer.Argument(metavar="ID")],
    targets: Annotated[
        list[str] | None, typer.Argument(help="Apps with the saga definitions (optional; older records need them).")
    ] = None,
    broker: BrokerOption = None,
    database: DatabaseOption = None,
) -> None:
    """Show one saga: state, error, and each step's status, attempts and timings
    (with --database, as kept in PostgreSQL)."""
    from choreo import admin

    async def go() -> SagaResult:
        if database:
            async with admin.database_sagas(database) as query:
                return await admin.query_saga(query, saga_id, apps=apps)
        async with admin.connected(broker) as instance:
            return await admin.saga_status(instance, saga_id, apps=apps)

    with errors():
        apps = load_targets(targets or [])
        result = asyncio.run(go())
    typer.echo(f"saga:   {result.saga_id}\nname:   {result.name} (version {result.version})\n"
               f"state:  {result.state.value}\ncorrelation: {result.correlation_id}")
    if result.error:
        where = f" (step {result.error['step']})" if result.error.get("step") else ""
        typer.echo(f"error:  {result.error.get('type', '')}: {result.error.get('message', '')}{where}")
    # The compensation columns: its runs, how long it took, its last failure.
    rows = [
        {"step": step.name, "status": str(step.status), "attempts": str(step.attempts),
         "started": step.started_at.strftime("%H:%M:%S.%f")[:-3] if step.started_at else "-",
         "duration": _duration(step.started_at, step.finished_at),
         "error": _message(step.error),
         "compensations": str(step.compensation_attempts),
         "comp_duration": _duration(step.compensation_started_at, step.compensation_finished_at),
         "comp_error": _message(step.compensation_error)}
        for step in result.steps
    ]
    typer.echo(render_table(rows, ("step", "status", "attempts", "started", "duration", "error",
                                   "compensations", "comp_duration", "comp_error")))


@saga_app.command("resume")
def saga_resume(
    saga_id: Annotated[str, typer.Argument(metavar="ID")],
    targets: Annotated[list[str], typer.Argument(help="The app holding the SagaCoordinator (and participants).")],
    broker: BrokerOption = None,
    database: DatabaseOption = None,
    wait: Annotated[bool, typer.Option(help="Run the given apps until the saga ends.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait with --wait.")] = 60.0,
) -> None:
    """Continue a saga from its stored state (e.g. a FAILED one after its cause was fixed).
    --database is the URL of a PostgresStateStore() that the app leaves to CHOREO_DATABASE_URL."""
    import os

    from choreo import admin
    from choreo.options import DATABASE_URL_ENV

    if database:
        os.environ[DATABASE_URL_ENV] = database  # read by PostgresStateStore() when the app runs
    with errors():
        apps = load_targets(targets)
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
    typer.echo(render_table(rows, ("id", "topic", "group", "attempts", "event_id", "reason")))


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
    if letter.size is not None:
        typer.echo(f"size:      {letter.size} bytes (the first {len(letter.raw)} kept)\nsha1:      {letter.sha1}")
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
