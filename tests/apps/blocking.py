"""A sync handler that blocks its thread: the worker must still stop on time."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from choreo import App

app = App("reports")


@app.on_event("report.requested")
def build_report(data: dict[str, Any]) -> None:
    with Path(data["ledger"]).open("a") as ledger:
        ledger.write(f"started {data['report_id']}\n")
    time.sleep(data["seconds"])
