"""A small system for the dashboard's tests: the order choreography of
``choreo demo``, an audit service whose handler dead-letters what it is sent
until ``FIXED`` says otherwise, and a coordinator with a saga that
compensates and one whose compensation fails (it ends FAILED)."""

from __future__ import annotations

from typing import Any

from choreo import App
from choreo.demo import build_order_apps
from choreo.saga import SagaCoordinator, SagaStep

#: Flip to let the audit handler succeed (replayed dead letters then go through).
FIXED = {"audit": False}

audit = App("audit_service")


@audit.on_event("audit.requested", retries=0)
@audit.emits("audit.recorded")
async def record_audit(data: dict[str, Any]) -> dict[str, Any]:
    if not FIXED["audit"]:
        raise ValueError(f"cannot audit {data.get('note', '')}")
    return {"recorded": True}


bookings = App("booking_service")
coordinator = SagaCoordinator(bookings, sweep_interval=None)
coordinator.define_saga("checkout", [
    SagaStep("reserve", "booking_service", "reserve", "release", timeout=5.0, retry_count=0),
    SagaStep("charge", "booking_service", "charge", "refund", timeout=5.0, retry_count=1, retry_delay=0.01),
])
coordinator.define_saga("trip", [
    SagaStep("book_hotel", "booking_service", "reserve", "cancel_hotel", timeout=5.0, retry_count=0),
    SagaStep("pay", "booking_service", "charge", None, timeout=5.0, retry_count=0),
])


@bookings.action("reserve")
async def reserve(data: dict[str, Any]) -> dict[str, Any]:
    return {"reservation": "R-1"}


@bookings.action("release")
async def release(data: dict[str, Any]) -> dict[str, Any]:
    return {}


@bookings.action("charge")
async def charge(data: dict[str, Any]) -> dict[str, Any]:
    if data.get("total", 0) > 100:
        raise RuntimeError(f"card declined for {data.get('customer', '?')}")
    return {"payment": "P-1"}


@bookings.action("refund")
async def refund(data: dict[str, Any]) -> dict[str, Any]:
    return {}


@bookings.action("cancel_hotel")
async def cancel_hotel(data: dict[str, Any]) -> dict[str, Any]:
    raise RuntimeError("hotel provider is down")


def build_apps() -> list[App]:
    """Every app of the lab (the order services are built fresh each time)."""
    return [*build_order_apps(), audit, bookings]
