"""choreo's schema in PostgreSQL: created on first use, upgraded in place from
an older release, `choreo db upgrade`, and a clear error for a user who may
not create tables."""

from __future__ import annotations

import uuid

import psycopg
import pytest

from choreo.errors import ConfigurationError
from choreo.postgres import SCHEMA_VERSION, PostgresStateStore
from choreo.postgres.schema import MIGRATIONS
from tests.postgres_server import PostgresServer
from tests.worker_process import choreo


def version(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT version FROM choreo_schema").fetchone()
        assert row is not None
        return int(row[0])


async def test_schema_is_created_on_first_use(database_url: str) -> None:
    async with PostgresStateStore(database_url) as store:
        assert await store.count_records() == {}
    assert version(database_url) == SCHEMA_VERSION


async def test_an_older_schema_is_upgraded_in_place_keeping_its_rows(database_url: str) -> None:
    """A database at schema 1 (the first release) with a saga in it is brought to the current schema on first use."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(MIGRATIONS[0].encode())
        conn.execute("UPDATE choreo_schema SET version = 1")
        conn.execute(
            "INSERT INTO choreo_sagas VALUES ('old', 'n', 'running', 1, 'old', 1, 1, NULL, NULL, %s::jsonb, 1)",
            ('{"schema":2,"saga_id":"old","name":"n","version":1,"state":"running","data":{},"error":null,'
             '"phase":"forward","cursor":0,"token":1,"kind":"action","attempt":1,"due_at":null,"deadline_at":null,'
             '"queue":[],"created_at":1,"updated_at":1,"steps":[]}',),
        )
    async with PostgresStateStore(database_url) as store:
        record = await store.get_record("old")
        assert record is not None and record.saga_id == "old"
    assert version(database_url) == SCHEMA_VERSION
    with psycopg.connect(database_url) as conn:
        indexes = {r[0] for r in conn.execute("SELECT indexname FROM pg_indexes WHERE tablename LIKE 'choreo_%'")}
    assert {"choreo_inbox_handled", "choreo_sagas_due"} <= indexes


def test_choreo_db_upgrade_creates_then_reports_current(database_url: str) -> None:
    first = choreo("db", "upgrade", database_url)
    assert first.returncode == 0, first.stderr
    assert f"from version 0 to {SCHEMA_VERSION}" in first.stdout
    again = choreo("db", "upgrade", env={"CHOREO_DATABASE_URL": database_url})
    assert again.returncode == 0 and f"at version {SCHEMA_VERSION} (current)" in again.stdout


async def test_user_without_ddl_rights_gets_a_clear_error_then_works_after_db_upgrade(
    postgres_server: PostgresServer, database_url: str
) -> None:
    """A user who may not create tables is told which right is missing and to run `choreo db upgrade`;
    after the owner runs it and grants the table rights, that user runs sagas' state fine."""
    role = f"app_{uuid.uuid4().hex[:8]}"
    dbname = database_url.rsplit("/", 1)[1]
    postgres_server.sql(f"CREATE ROLE {role} LOGIN")
    postgres_server.sql(f"REVOKE CREATE ON SCHEMA public FROM PUBLIC; GRANT USAGE ON SCHEMA public TO {role}", dbname)
    limited = postgres_server.url(dbname, user=role)
    with pytest.raises(ConfigurationError) as caught:
        async with PostgresStateStore(limited):
            pass
    message = str(caught.value)
    assert f"user {role!r} lacks the CREATE privilege on schema 'public'" in message
    assert "choreo db upgrade" in message
    cli = choreo("saga", "list", "--database", limited)
    assert cli.returncode == 2 and "CREATE privilege" in cli.stderr
    assert choreo("db", "upgrade", database_url).returncode == 0
    postgres_server.sql(
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role};"
        f" GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}", dbname)
    async with PostgresStateStore(limited) as store:
        assert await store.count_records() == {}
