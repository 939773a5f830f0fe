"""``PostgresStateStore``: saga records in PostgreSQL, commands in its outbox.

A transition is one SQL statement, so one round trip and one transaction:
the record's compare-and-set on ``row_version``, the inbox row of the reply
or timer it handles (a second delivery of that event finds it and changes
nothing), and the commands, timers and lifecycle events as outbox rows.
With the read before it, a saga step costs two round trips; the relay
publishes the outbox rows of many steps per pass (``choreo.postgres.relay``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from brokers import CommitStatus, Message
from choreo.events import Event, child_event
from choreo.postgres.database import Database
from choreo.postgres.relay import Relay, outbox_rows
from choreo.routing import Emit
from choreo.saga.definition import SagaState
from choreo.saga.query import Cursor
from choreo.saga.record import SagaRecord
from choreo.saga.run import Out
from choreo.saga.stores import Stored, all_records

if TYPE_CHECKING:
    from choreo.context import Context
    from choreo.lifecycle import Running

__all__ = ("PostgresStateStore",)

_ACTIVE = "('pending', 'running', 'compensating')"  # as in the partial indexes of schema 2
_COLUMNS = "state, definition_version, correlation_id, updated_at, due_at, deadline_at, record"
_OUTBOX = (
    " outbox AS (INSERT INTO choreo_outbox (event_id, topic, grp, body, due_at)"
    " SELECT u.* FROM unnest(%(ids)s::text[], %(topics)s::text[], %(groups)s::text[], %(bodies)s::bytea[],"
    " %(due)s::float8[]) AS u, saga)"
)
_SEEN = "seen AS (SELECT 1 FROM choreo_inbox WHERE consumer = %(consumer)s AND event_id = %(event)s),"
_INBOX = (
    " inbox AS (INSERT INTO choreo_inbox (consumer, event_id)"
    " SELECT %(consumer)s, %(event)s FROM saga ON CONFLICT DO NOTHING),"
)
_MATCH = "saga_id = %(saga_id)s AND row_version = %(version)s"
_SET = (
    "state = %(state)s, definition_version = %(dv)s, correlation_id = %(correlation)s, updated_at = %(updated)s,"
    " due_at = %(due_at)s, deadline_at = %(deadline)s, record = %(record)s::jsonb, row_version = row_version + 1"
)

_INSERT = (
    "WITH saga AS (INSERT INTO choreo_sagas (saga_id, name, created_at, row_version, " + _COLUMNS + ")"
    " VALUES (%(saga_id)s, %(name)s, %(created)s, 1, %(state)s, %(dv)s, %(correlation)s, %(updated)s,"
    " %(due_at)s, %(deadline)s, %(record)s::jsonb) ON CONFLICT (saga_id) DO NOTHING RETURNING 1),"
    + _OUTBOX + " SELECT false, EXISTS (SELECT 1 FROM saga)"
)
_UPDATE = (
    "WITH saga AS (UPDATE choreo_sagas SET " + _SET + " WHERE " + _MATCH + " RETURNING 1),"
    + _OUTBOX + " SELECT false, EXISTS (SELECT 1 FROM saga)"
)
#: A transition inside a handler: nothing if the inbox has the event already.
_HANDLED_UPDATE = (
    "WITH " + _SEEN + " saga AS (UPDATE choreo_sagas SET " + _SET + " WHERE " + _MATCH
    + " AND NOT EXISTS (SELECT 1 FROM seen) RETURNING 1)," + _INBOX + _OUTBOX
    + " SELECT EXISTS (SELECT 1 FROM seen), EXISTS (SELECT 1 FROM saga)"
)
_HANDLED_DELETE = (
    "WITH " + _SEEN + " saga AS (DELETE FROM choreo_sagas WHERE " + _MATCH
    + " AND NOT EXISTS (SELECT 1 FROM seen) RETURNING 1)," + _INBOX + _OUTBOX
    + " SELECT EXISTS (SELECT 1 FROM seen), EXISTS (SELECT 1 FROM saga)"
)


class PostgresStateStore:
    """Saga records in PostgreSQL tables (see ``choreo.postgres.schema``):
    ``SagaCoordinator(app, state_store=PostgresStateStore(url))``.

    It is also the ``SagaQuery`` that ``choreo saga list|status`` and the
    dashboard read, with indexes for each question (by state, by name,
    newest first from a cursor). Outside a running app, open it with
    ``async with PostgresStateStore(url) as store:``.

    Args:
        url: ``postgresql://...``; ``None``: ``CHOREO_DATABASE_URL`` when first used.
        pool_size: Connections this store opens at most per process.
        relay_poll: Seconds between the relay's looks for rows other
            processes committed (its own commits wake it at once).
        inbox_retention: Seconds the inbox remembers a handled event.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        pool_size: int = 10,
        relay_poll: float = 1.0,
        inbox_retention: float = 7 * 86400.0,
    ) -> None:
        self.database = Database(url, pool_size=pool_size)
        self.relay = Relay(self.database, poll=relay_poll, inbox_retention=inbox_retention)
        self._runtime: Running | None = None

    def __repr__(self) -> str:
        return f"PostgresStateStore({self.database!r})"

    async def __aenter__(self) -> PostgresStateStore:
        await self.database.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.database.close()

    @contextlib.asynccontextmanager
    async def lifespan(self, runtime: Running) -> AsyncIterator[None]:
        await self.database.open()
        previous, self._runtime = self._runtime, runtime
        try:
            runtime.start_task(self.relay.run(runtime), name="choreo-saga-outbox-relay")
            yield
        finally:
            self._runtime = previous
            await self.database.close()

    # -- transitions ---------------------------------------------------------------

    async def load(self, saga_id: str, runtime: Running) -> Stored | None:
        return await self._load(saga_id)

    async def load_in(self, ctx: Context, saga_id: str) -> Stored | None:
        return await self._load(saga_id)

    async def _load(self, saga_id: str) -> Stored | None:
        async with self.database.connection() as conn:
            cur = await conn.execute("SELECT record, row_version FROM choreo_sagas WHERE saga_id = %s", (saga_id,))
            row = await cur.fetchone()
        return None if row is None else Stored(SagaRecord.from_dict(row[0]), row[1])

    async def save(
        self,
        runtime: Running,
        saga_id: str,
        version: int,
        record: SagaRecord,
        events: Sequence[tuple[Event, float | None]],
    ) -> CommitStatus:
        # Encoded as runtime.commit encodes a broker commit: the runtime's size limit, and its
        # middleware's publishing context (a traceparent per event) around the write.
        with runtime.outbox.publishing(events) as messages:
            params = {**_record_params(record), **_outbox_params(messages), "saga_id": saga_id, "version": version}
            _, written = await self._write(_INSERT if version == 0 else _UPDATE, params)
        return CommitStatus.OK if written else CommitStatus.CONFLICT

    async def save_in(
        self, ctx: Context, saga_id: str, version: int, record: SagaRecord | None, outs: Sequence[Out]
    ) -> list[Emit] | None:
        event = ctx.event
        if self._runtime is None:
            raise RuntimeError("the PostgreSQL state store writes transitions while its coordinator's app runs")
        # Encoded as the dispatcher encodes a handler's events: the runtime's size limit, the
        # middleware's headers (the handling span's traceparent).
        encode = self._runtime.outbox.emitted
        messages = [
            encode(child_event(event, out.type, dict(out.data), out.headers), out.delay)
            for out in outs
        ]
        params: dict[str, Any] = {
            **_outbox_params(messages),
            "saga_id": saga_id,
            "version": version,
            "consumer": f"{ctx.service}.{ctx.handler}",
            "event": event.id,
        }
        if record is not None:
            params.update(_record_params(record))
        seen, written = await self._write(_HANDLED_UPDATE if record is not None else _HANDLED_DELETE, params)
        if seen or written:
            return []  # committed here, or in an earlier delivery of this event: ack it, publish nothing
        return None

    async def _write(self, sql: str, params: dict[str, Any]) -> tuple[bool, bool]:
        async with self.database.connection() as conn:
            cur = await conn.execute(sql, params)
            row = await cur.fetchone()
        assert row is not None
        if row[1] and params["ids"]:
            self.relay.wake()
        return bool(row[0]), bool(row[1])

    async def overdue(self, now: float, grace: float, runtime: Running) -> list[SagaRecord]:
        sql = (
            f"SELECT record FROM choreo_sagas WHERE state IN {_ACTIVE} AND due_at < %(t)s"
            f" UNION SELECT record FROM choreo_sagas WHERE state IN {_ACTIVE} AND deadline_at < %(t)s"
        )
        return await self._records(sql, {"t": now - grace})

    async def records(self, state: SagaState | None, runtime: Running) -> list[SagaRecord]:
        return await all_records(self, state)

    # -- SagaQuery -------------------------------------------------------------------

    async def get_record(self, saga_id: str) -> SagaRecord | None:
        stored = await self._load(saga_id)
        return None if stored is None else stored.record

    async def page_records(
        self,
        *,
        state: SagaState | None = None,
        name: str | None = None,
        after: Cursor | None = None,
        limit: int = 50,
    ) -> list[SagaRecord]:
        where, params = _filters(state, name)
        if after is not None:
            where.append("(created_at, saga_id) < (%(after_at)s, %(after_id)s)")
            params.update(after_at=after.created_at, after_id=after.saga_id)
        sql = "SELECT record FROM choreo_sagas"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, saga_id DESC LIMIT %(limit)s"
        params["limit"] = limit
        return await self._records(sql, params)

    async def count_records(self, *, name: str | None = None) -> dict[SagaState, int]:
        where, params = _filters(None, name)
        sql = "SELECT state, count(*) FROM choreo_sagas"
        if where:
            sql += " WHERE " + " AND ".join(where)
        async with self.database.connection() as conn:
            cur = await conn.execute(sql + " GROUP BY state", params)
            rows = await cur.fetchall()
        return {SagaState(state): count for state, count in rows}

    async def explain(self, *, state: SagaState | None = None, name: str | None = None) -> str:
        """The plan of the first page's query (how operators check it uses an index)."""
        where, params = _filters(state, name)
        sql = "EXPLAIN SELECT record FROM choreo_sagas" + (" WHERE " + " AND ".join(where) if where else "")
        async with self.database.connection() as conn:
            cur = await conn.execute(sql + " ORDER BY created_at DESC, saga_id DESC LIMIT 50", params)
            return "\n".join(row[0] for row in await cur.fetchall())

    async def _records(self, sql: str, params: dict[str, Any]) -> list[SagaRecord]:
        async with self.database.connection() as conn:
            cur = await conn.execute(sql, params)
            rows = await cur.fetchall()
        return [SagaRecord.from_dict(row[0]) for row in rows]


def _filters(state: SagaState | None, name: str | None) -> tuple[list[str], dict[str, Any]]:
    where: list[str] = []
    params: dict[str, Any] = {}
    if state is not None:
        where.append("state = %(state)s")
        params["state"] = state.value
    if name is not None:
        where.append("name = %(name)s")
        params["name"] = name
    return where, params


def _record_params(record: SagaRecord) -> dict[str, Any]:
    return {
        "name": record.name,
        "state": record.state.value,
        "dv": record.version,
        "correlation": record.correlation,
        "created": record.created_at,
        "updated": record.updated_at,
        "due_at": record.due_at,
        "deadline": record.deadline_at,
        "record": record.to_json().decode(),
    }


def _outbox_params(messages: Sequence[Message]) -> dict[str, Any]:
    ids, topics, groups, bodies, due = outbox_rows(messages, time.time())
    return {"ids": ids, "topics": topics, "groups": groups, "bodies": bodies, "due": due}
