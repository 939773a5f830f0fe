"""A handler that fails until its cause is fixed (a file exists), with no
retries and no failure event: its messages go to the dead-letter stream."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from choreo import App

app = App("billing")


class MissingConfiguration(Exception):
    """The handler's dependency is not there yet."""


@app.on_event("invoice.requested", retries=0)
async def send_invoice(data: dict[str, Any]) -> None:
    if not Path(data["fixed_marker"]).exists():
        raise MissingConfiguration("billing provider is not configured")
    with Path(data["ledger"]).open("a") as ledger:
        ledger.write(f"invoiced {data['invoice_id']}\n")
