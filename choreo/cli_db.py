"""``choreo db``: choreo's tables in PostgreSQL."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from choreo.cli_support import errors

db_app = typer.Typer(help="Create and upgrade choreo's tables in PostgreSQL.", no_args_is_help=True)


@db_app.command("upgrade")
def db_upgrade(
    url: Annotated[
        str | None, typer.Argument(metavar="URL", envvar="CHOREO_DATABASE_URL", help="PostgreSQL URL (postgresql://...).")
    ] = None,
) -> None:
    """Create choreo's tables, or upgrade them to this release's schema, in place.
    Run it as a user allowed to create tables (workers create them on first use
    when they may; a user without that right needs this run once)."""
    from choreo.postgres.database import Database
    from choreo.postgres.schema import SCHEMA_VERSION, upgrade

    async def go() -> tuple[int, int]:
        database = Database(url, pool_size=1)
        try:
            async with database.connection() as conn:
                return await upgrade(conn)
        finally:
            await database.close()

    with errors():
        before, after = asyncio.run(go())
    if before == after:
        typer.echo(f"choreo schema is at version {after} (current)")
    else:
        typer.echo(f"choreo schema upgraded from version {before} to {after} (current: {SCHEMA_VERSION})")
