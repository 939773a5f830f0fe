"""Transactional handlers: a handler's writes, its events and its inbox row in one transaction.

``choreo.run(*apps, database=url)`` (``choreo worker --database URL``)
installs ``TransactionalHandlers`` in the runtime, and a handler asks for a
transaction::

    async def reserve(data: dict, ctx: Context) -> dict:
        async with ctx.transaction() as conn:
            await conn.execute("UPDATE stock SET left = left - 1 WHERE sku = %s", (data["sku"],))
        return {"reserved": True}

What happens, in order:

1. ``BEGIN`` and ``INSERT`` of (the handler's group, the event id) into
   ``choreo_inbox``, in one round trip. If the row exists, an earlier
   delivery of this event committed: ``AlreadyHandled`` is raised, the body
   does not run, and the delivery is acked with nothing applied.
2. The body runs on ``conn``, inside the transaction.
3. Leaving the block does not commit: the dispatcher first turns the
   handler's return value into events, inserts them into ``choreo_outbox``
   and commits, in one round trip. Then it acks the delivery.
4. The relay publishes the outbox rows (``choreo.postgres.relay``).

A crash before the commit leaves nothing (the delivery comes back); after it,
the redelivery finds the inbox row (step 1) and the events are published
once from the outbox. A serialization failure or deadlock runs the handler
again at once; a lost connection runs it again after a pause.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from brokers import Message
from choreo.context import DATABASE, Context
from choreo.errors import AlreadyHandled
from choreo.postgres.database import Database, database_errors
from choreo.postgres.relay import INSERT_OUTBOX, Relay, outbox_rows

if TYPE_CHECKING:
    from psycopg import AsyncConnection

    from choreo.lifecycle import Lifespan, Running

__all__ = ("HeldTransaction", "TransactionalHandlers", "database_lifespan")

_INBOX = "INSERT INTO choreo_inbox (consumer, event_id) VALUES (%s, %s) ON CONFLICT DO NOTHING"


class HeldTransaction:
    """One handler's open transaction, from ``BEGIN`` until the dispatcher
    commits it with the handler's events or releases it."""

    def __init__(self, conn: AsyncConnection[Any], release: contextlib.AsyncExitStack, url: str, relay: Relay) -> None:
        self.conn = conn
        self.handled_before = False
        self.committed = False
        self._release = release
        self._url = url
        self._relay = relay

    async def commit(self, messages: Sequence[Message]) -> None:
        """Insert ``messages`` into the outbox and commit, in one round trip.

        Raises:
            TransactionConflict: a serialization failure or deadlock (nothing committed).
            DatabaseUnavailable: the connection failed (the commit may or may
                not have happened: the inbox tells the next delivery).
        """
        with database_errors(self._url):
            async with self.conn.pipeline():
                if messages:
                    await self.conn.execute(INSERT_OUTBOX, outbox_rows(messages, time.time()))
                await self.conn.execute("COMMIT")
        self.committed = True
        if messages:
            self._relay.wake()

    async def release(self) -> None:
        """Roll back unless committed, and give the connection back."""
        if not self.committed and not self.conn.closed:
            with contextlib.suppress(Exception):
                await self.conn.execute("ROLLBACK")
        await self._release.aclose()


class TransactionalHandlers:
    """What ``ctx.transaction()`` uses: a database and the relay of its outbox."""

    def __init__(self, database: Database, relay: Relay) -> None:
        self.database = database
        self.relay = relay

    @contextlib.asynccontextmanager
    async def transaction(self, ctx: Context) -> AsyncIterator[AsyncConnection[Any]]:
        """A transaction for the handler of ``ctx`` (see the module doc).

        Raises:
            AlreadyHandled: an earlier delivery of this event committed.
            DatabaseUnavailable: the database cannot be reached.
        """
        url = self.database.url
        stack = contextlib.AsyncExitStack()
        conn = await stack.enter_async_context(self.database.connection())
        held = HeldTransaction(conn, stack, url, self.relay)
        try:
            with database_errors(url):
                async with conn.pipeline():
                    await conn.execute("BEGIN")
                    cur = await conn.execute(_INBOX, (f"{ctx.service}.{ctx.handler}", ctx.event.id))
            held.handled_before = cur.rowcount == 0
        except BaseException:
            await held.release()
            raise
        ctx.hold(held)
        if held.handled_before:
            await held.release()
            raise AlreadyHandled(f"event {ctx.event.id} was handled by {ctx.service}.{ctx.handler} before")
        with database_errors(url):
            yield conn


def database_lifespan(url: str | None, *, pool_size: int = 10) -> Lifespan:
    """The lifespan hook that attaches the database at ``url`` to a runtime:
    schema made current, ``ctx.transaction()`` available, its outbox relayed."""

    @contextlib.asynccontextmanager
    async def attach(runtime: Running) -> AsyncIterator[None]:
        database = Database(url, pool_size=pool_size)
        relay = Relay(database)
        await database.open()
        try:
            runtime.extensions[DATABASE] = TransactionalHandlers(database, relay)
            runtime.start_task(relay.run(runtime), name="choreo-outbox-relay")
            yield
        finally:
            await database.close()

    return attach
