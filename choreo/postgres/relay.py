"""The outbox relay: events committed in PostgreSQL, published to the broker.

A saga transition or a transactional handler inserts its events into
``choreo_outbox`` in the transaction that holds its other writes. Every
worker runs a relay, which publishes them and deletes them in one database
transaction around the publish::

    BEGIN; DELETE FROM choreo_outbox WHERE seq IN (
        SELECT seq FROM choreo_outbox ORDER BY seq LIMIT n FOR UPDATE SKIP LOCKED) RETURNING ...
    -- publish the rows to the broker
    COMMIT   (ROLLBACK if the publish failed: the rows stay for the next pass)

Row locks with ``SKIP LOCKED`` rather than an advisory lock per partition:
relays in many workers take disjoint batches at once, with no partition
count to choose and no idle relay while one partition is busy, and a crashed
relay's locks go with its session. A row is published once in normal
operation (it is locked until deleted); a relay killed between the publish
and the ``COMMIT`` leaves its rows to be published again, and consumers
dedupe them by event id, which the relay keeps. Two round trips per batch
(``BEGIN`` and the ``DELETE`` pipelined, then ``COMMIT``), however many
events it carries.

The relay wakes when this process commits outbox rows, and otherwise looks
every ``poll`` seconds (for rows other processes left). It also deletes inbox
rows older than the retention, on a schedule.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from brokers import Message
from brokers.base import new_message
from choreo.failpoints import ACTIVE, hit
from choreo.lifecycle import OUTBOX_RELAYS
from choreo.postgres.database import Database

if TYPE_CHECKING:
    from psycopg import AsyncConnection

    from choreo.lifecycle import Running

__all__ = ("INSERT_OUTBOX", "Relay", "outbox_rows")

log = logging.getLogger("choreo.postgres")

#: Inserts a batch of outbox rows from five arrays (see ``outbox_rows``).
INSERT_OUTBOX = (
    "INSERT INTO choreo_outbox (event_id, topic, grp, body, due_at)"
    " SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::bytea[], %s::float8[])"
)

_TAKE = (
    "DELETE FROM choreo_outbox WHERE seq IN"
    " (SELECT seq FROM choreo_outbox ORDER BY seq LIMIT %s FOR UPDATE SKIP LOCKED)"
    " RETURNING seq, event_id, topic, grp, body, due_at"
)

_CLEAN_INBOX = (
    "DELETE FROM choreo_inbox WHERE ctid IN (SELECT ctid FROM choreo_inbox"
    " WHERE handled_at < now() - make_interval(secs => %s) LIMIT %s)"
)

#: Publishes a batch of messages (``Running.relay``: the broker, then the middleware).
Publish = Callable[[Sequence[Message]], Awaitable[None]]


def outbox_rows(messages: Sequence[Message], now: float) -> tuple[list[Any], ...]:
    """``messages`` as the five arrays ``INSERT_OUTBOX`` takes; a delay becomes a due time."""
    return (
        [m.id for m in messages],
        [m.topic for m in messages],
        [m.group for m in messages],
        [m.body for m in messages],
        [now + m.delay if m.delay else None for m in messages],
    )


class Relay:
    """Publishes one database's outbox through ``publish``.

    Args:
        database: Whose outbox.
        batch: Rows per pass at most.
        poll: Seconds between looks when nothing woke it.
        inbox_retention: Seconds inbox rows are kept (longer than any
            redelivery of an event can come: the broker's dedupe time).
        cleanup_interval: Seconds between inbox clean-ups.
    """

    def __init__(
        self,
        database: Database,
        *,
        batch: int = 500,
        poll: float = 1.0,
        inbox_retention: float = 7 * 86400.0,
        cleanup_interval: float = 600.0,
    ) -> None:
        self.database = database
        self.batch = batch
        self.poll = poll
        self.inbox_retention = inbox_retention
        self.cleanup_interval = cleanup_interval
        self._wake = asyncio.Event()
        self._passes = 0

    @property
    def pending(self) -> bool:
        """Whether this process committed rows the relay has not published yet (or it is mid-pass)."""
        return self._wake.is_set() or self._passes > 0

    def wake(self) -> None:
        """Rows were committed here: relay them now rather than at the next poll."""
        self._wake.set()

    async def relay_once(self, publish: Publish) -> int:
        """Publish up to ``batch`` rows and delete them; return how many.

        Raises:
            DatabaseUnavailable: the database failed (the rows stay).
            BrokerUnavailable: the publish failed (rolled back: the rows stay).
        """
        self._passes += 1
        try:
            return await self._relay_once(publish)
        finally:
            self._passes -= 1

    async def _relay_once(self, publish: Publish) -> int:
        async with self.database.connection() as conn:
            async with conn.pipeline():
                await conn.execute("BEGIN")
                cur = await conn.execute(_TAKE, (self.batch,))
            rows = await cur.fetchall()
            if not rows:
                await conn.execute("ROLLBACK")
                return 0
            now = time.time()
            rows.sort(key=lambda row: row[0])  # RETURNING keeps no order; publish in commit order
            messages = [
                new_message(topic, event_id, bytes(body), None if due is None else max(0.0, due - now), grp)
                for _, event_id, topic, grp, body, due in rows
            ]
            try:
                await publish(messages)
                if ACTIVE:
                    await hit("relay.after_publish")
            except BaseException:
                await _rollback(conn)
                raise
            await conn.execute("COMMIT")
            return len(rows)

    async def clean_inbox(self, chunk: int = 10_000) -> int:
        """Delete inbox rows older than the retention, ``chunk`` at a time; return how many."""
        deleted = 0
        while True:
            async with self.database.connection() as conn:
                cur = await conn.execute(_CLEAN_INBOX, (self.inbox_retention, chunk))
            deleted += cur.rowcount
            if cur.rowcount < chunk:
                return deleted

    async def run(self, runtime: Running) -> None:
        """Relay through ``runtime`` until cancelled: a failed pass is logged
        and tried again after a pause growing to 5 s."""
        runtime.extensions.setdefault(OUTBOX_RELAYS, []).append(self)
        publish = runtime.relay
        pause = 0.1
        cleaned = time.monotonic()
        while True:
            self._wake.clear()
            try:
                moved = await self.relay_once(publish)
                if time.monotonic() - cleaned > self.cleanup_interval:
                    cleaned = time.monotonic()
                    gone = await self.clean_inbox()
                    if gone:
                        log.info("deleted %d inbox rows older than %.0fs", gone, self.inbox_retention)
                pause = 0.1
            except Exception as exc:
                log.warning("outbox relay failed, trying again in %.1fs: %s", pause, exc)
                await asyncio.sleep(pause)
                pause = min(5.0, pause * 2)
                continue
            if moved >= self.batch:
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll):
                    await self._wake.wait()


async def _rollback(conn: AsyncConnection[Any]) -> None:
    with contextlib.suppress(Exception):
        await asyncio.shield(conn.execute("ROLLBACK"))
