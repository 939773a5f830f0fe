"""A one-hop flow for fault tests: ``fault.job`` -> ``fault.done``.

The handler appends ``start <event id> <pid>`` to the file named in the
event's ``ledger`` field when it begins and ``effect <event id> <pid>`` when
its work is done (one ``write`` on an ``O_APPEND`` descriptor per line, so
lines from several processes never interleave). It then returns, and the
worker emits ``fault.done`` (causation id = the job's id) and acks the job in
one commit. The ledger counts executions (at least once); the follow-on
stream counts committed effects (exactly once).

Optional fields: ``seconds`` (sleep before the effect) and ``hold`` (a path:
the handler waits while that file exists, at most 60 s).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from choreo import App, Event
from tests.apps import append_line

app = App("ledger")


@app.on_event("fault.job", retries=0)
@app.emits("fault.done")
async def work(event: Event, data: dict[str, Any]) -> dict[str, Any]:
    pid = os.getpid()
    append_line(data["ledger"], f"start {event.id} {pid}")
    seconds = float(data.get("seconds", 0.0))
    if seconds:
        await asyncio.sleep(seconds)
    hold = data.get("hold")
    if hold:
        for _ in range(3000):
            if not Path(hold).exists():
                break
            await asyncio.sleep(0.02)
    append_line(data["ledger"], f"effect {event.id} {pid}")
    return {"by": pid}
