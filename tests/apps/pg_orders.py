"""Transactional handlers for the PostgreSQL tests: ``pg.order`` -> ``pg.recorded``.

``record`` inserts a row for the order into ``pg_orders`` inside
``ctx.transaction()`` and emits ``pg.recorded``; the row, the event and the
inbox row commit together. It appends ``start <event id> <pid>`` to the file
named by the event's ``ledger`` field (when given) before it runs, so a test
sees that a fault really made it run twice. ``fail_once`` in the data makes the
first attempt raise after its write (which must be rolled back).
"""

from __future__ import annotations

import os
from typing import Any

from choreo import App, Context, Event
from tests.apps import append_line

app = App("pgshop")

TABLE = "CREATE TABLE IF NOT EXISTS pg_orders (order_id text NOT NULL, event_id text NOT NULL, attempt int NOT NULL)"


@app.on_event("pg.order", retries=2, retry_delay=0.01)
@app.emits("pg.recorded")
async def record(event: Event, data: dict[str, Any], ctx: Context) -> dict[str, Any]:
    if data.get("ledger"):
        append_line(data["ledger"], f"start {event.id} {os.getpid()}")
    async with ctx.transaction() as conn:
        await conn.execute(
            "INSERT INTO pg_orders (order_id, event_id, attempt) VALUES (%s, %s, %s)",
            (data["order"], event.id, ctx.attempt),
        )
        if data.get("fail_once") and ctx.attempt == 1:
            raise RuntimeError("failing after the write, once")
    return {"recorded": True}
