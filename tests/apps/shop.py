"""A two-step flow for worker tests: orders are accepted, slow jobs finish late.

Effects are appended to the file named in the event's ``ledger`` field, one
line per effect, so a test can count them from outside the worker.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from choreo import App

app = App("shop")


def record(data: dict[str, Any], line: str) -> None:
    with Path(data["ledger"]).open("a") as ledger:
        ledger.write(line + "\n")


@app.on_event("order.created")
@app.emits("order.accepted", "order.rejected")
async def accept_order(data: dict[str, Any]) -> dict[str, Any]:
    record(data, f"accepted {data['order_id']}")
    return {"status": "accepted"}


@app.on_event("order.accepted")
async def notify(data: dict[str, Any]) -> None:
    record(data, f"notified {data['order_id']}")


@app.on_event("order.rejected")
async def log_rejection(data: dict[str, Any]) -> None:
    record(data, f"rejected {data['order_id']}")


@app.on_event("job.slow", retries=0)
async def slow_job(data: dict[str, Any]) -> None:
    record(data, f"started {data['job_id']}")
    await asyncio.sleep(float(data.get("seconds", 1.0)))
    record(data, f"finished {data['job_id']}")
