"""A saga whose payment always fails and whose compensation fails until its
cause is fixed (a marker file exists): it ends FAILED, and resumes to
COMPENSATED once fixed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from choreo import App
from choreo.saga import SagaCoordinator, SagaStep

app = App("trip_service")
coordinator = SagaCoordinator(app, sweep_interval=None)
coordinator.define_saga("trip", [
    SagaStep("book_hotel", "trip_service", "book_hotel", "cancel_hotel", timeout=5.0, retry_count=0),
    SagaStep("pay", "trip_service", "pay", "refund", timeout=5.0, retry_count=0),
])


class ProviderDown(Exception):
    """The hotel provider cannot cancel right now."""


@app.action("book_hotel")
async def book_hotel(data: dict[str, Any]) -> dict[str, Any]:
    return {"booking": "H-1"}


@app.action("cancel_hotel")
async def cancel_hotel(data: dict[str, Any]) -> dict[str, Any]:
    if not Path(data["fixed_marker"]).exists():
        raise ProviderDown("hotel provider is down")
    return {"cancelled": True}


@app.action("pay")
async def pay(data: dict[str, Any]) -> dict[str, Any]:
    raise RuntimeError("card declined")


@app.action("refund")
async def refund(data: dict[str, Any]) -> dict[str, Any]:
    return {}
