"""choreo's tables in PostgreSQL, and the migrations that create and upgrade them.

``MIGRATIONS[n]`` takes a database from schema version ``n`` to ``n + 1``;
``choreo_schema`` holds the version reached. ``upgrade`` applies what is
missing in one transaction under an advisory lock, so workers starting
together upgrade once and a failed upgrade leaves the old schema whole.

The tables:

* ``choreo_sagas``: one row per saga, the record as JSON plus the columns
  operators query (state, name, correlation id, times), each indexed;
  ``row_version`` is the compare-and-set version.
* ``choreo_outbox``: events committed with a saga transition or a
  transactional handler, waiting for the relay to publish them
  (``choreo.postgres.relay``); a row is deleted once published.
* ``choreo_inbox``: one row per (consumer group, event id) handled in a
  transaction, so a redelivered event changes nothing twice; rows older
  than the retention are deleted on a schedule.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from choreo.errors import ConfigurationError

if TYPE_CHECKING:
    from psycopg import AsyncConnection

__all__ = ("MIGRATIONS", "SCHEMA_VERSION", "schema_version", "upgrade")

log = logging.getLogger("choreo.postgres")

#: Serializes upgrades across processes (an arbitrary constant: "choreo" in ASCII).
_UPGRADE_LOCK = 0x63686F72656F

MIGRATIONS: tuple[str, ...] = (
    # 0 -> 1: sagas, outbox, inbox.
    """
    CREATE TABLE choreo_schema (version integer NOT NULL);
    INSERT INTO choreo_schema VALUES (0);
    CREATE TABLE choreo_sagas (
        saga_id text PRIMARY KEY,
        name text NOT NULL,
        state text NOT NULL,
        definition_version integer NOT NULL,
        correlation_id text NOT NULL,
        created_at double precision NOT NULL,
        updated_at double precision NOT NULL,
        due_at double precision,
        deadline_at double precision,
        record jsonb NOT NULL,
        row_version bigint NOT NULL
    );
    CREATE INDEX choreo_sagas_created ON choreo_sagas (created_at, saga_id);
    CREATE INDEX choreo_sagas_state ON choreo_sagas (state, created_at, saga_id);
    CREATE INDEX choreo_sagas_name ON choreo_sagas (name, created_at, saga_id);
    CREATE INDEX choreo_sagas_name_state ON choreo_sagas (name, state, created_at, saga_id);
    CREATE INDEX choreo_sagas_updated ON choreo_sagas (updated_at);
    CREATE INDEX choreo_sagas_correlation ON choreo_sagas (correlation_id);
    CREATE TABLE choreo_outbox (
        seq bigserial PRIMARY KEY,
        event_id text NOT NULL,
        topic text NOT NULL,
        grp text,
        body bytea NOT NULL,
        due_at double precision
    );
    CREATE TABLE choreo_inbox (
        consumer text NOT NULL,
        event_id text NOT NULL,
        handled_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (consumer, event_id)
    );
    """,
    # 1 -> 2: the inbox is cleaned up by age, and the sweeper finds overdue
    # sagas among running ones without reading finished ones.
    """
    CREATE INDEX choreo_inbox_handled ON choreo_inbox (handled_at);
    CREATE INDEX choreo_sagas_due ON choreo_sagas (due_at) WHERE state IN ('pending', 'running', 'compensating');
    CREATE INDEX choreo_sagas_deadline ON choreo_sagas (deadline_at)
        WHERE state IN ('pending', 'running', 'compensating');
    """,
)

#: The schema version this release reads and writes.
SCHEMA_VERSION = len(MIGRATIONS)


async def schema_version(conn: AsyncConnection[Any]) -> int:
    """The schema version of the connected database (0: no choreo tables)."""
    cur = await conn.execute("SELECT to_regclass('choreo_schema') IS NOT NULL")
    exists = await cur.fetchone()
    if not exists or not exists[0]:
        return 0
    cur = await conn.execute("SELECT version FROM choreo_schema")
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def upgrade(conn: AsyncConnection[Any], target: int = SCHEMA_VERSION) -> tuple[int, int]:
    """Bring the schema up to ``target``; ``conn`` must be in autocommit mode.

    Returns:
        The versions before and after.

    Raises:
        ConfigurationError: the schema is newer than this release, or the
            user lacks the right to create tables (naming the right, and
            ``choreo db upgrade`` as the fix).
    """
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_UPGRADE_LOCK,))
        before = await schema_version(conn)
        if before > SCHEMA_VERSION:
            raise ConfigurationError(
                f"the database's choreo schema is version {before}; this release knows up to {SCHEMA_VERSION}: "
                "upgrade choreo"
            )
        if before >= target:
            return before, before
        await _check_create_right(conn, before, target)
        for version in range(before, target):
            await conn.execute(MIGRATIONS[version].encode())
            await conn.execute("UPDATE choreo_schema SET version = %s", (version + 1,))
        log.info("choreo schema upgraded from version %d to %d", before, target)
        return before, target


async def _check_create_right(conn: AsyncConnection[Any], before: int, target: int) -> None:
    cur = await conn.execute(
        "SELECT current_user, current_database(), current_schema(),"
        " has_schema_privilege(current_user, current_schema(), 'CREATE')"
    )
    row = await cur.fetchone()
    assert row is not None
    user, database, schema, can_create = row
    if not can_create:
        raise ConfigurationError(
            f"the database user {user!r} lacks the CREATE privilege on schema {schema!r} of database "
            f"{database!r}, needed to bring choreo's tables from schema version {before} to {target}. "
            "Run `choreo db upgrade URL` once with a user that has it (e.g. the database owner), "
            f"then grant {user!r} SELECT, INSERT, UPDATE, DELETE on the choreo_* tables and USAGE on their sequences"
        )
