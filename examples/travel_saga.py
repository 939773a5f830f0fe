"""A trip: book a flight, a hotel and a rental car, or none of them.

Run it: ``python examples/travel_saga.py [broker-url]`` (in memory by default).

The first trip books all three. The second asks for a car in a city with no
cars left: the car step fails after its retries, so the saga cancels the hotel
and then the flight, in reverse order, and ends COMPENSATED. The hotel's
booking service times out once; the step's ``timeout`` and ``retry_count``
absorb it.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Any

from choreo import App, Context, SagaCoordinator, SagaResult, SagaStep
from choreo.testing import run_apps


class SoldOut(Exception):
    """Nothing left to book."""


class Bookings:
    """Each provider's bookings, keyed by the saga's idempotency key."""

    def __init__(self) -> None:
        self.active: dict[str, str] = {}
        self.cancelled: dict[str, str] = {}
        self.slow_hotel_once = True
        self.cars_left = {"Lisbon": 3, "Reykjavik": 0}

    def book(self, ctx: Context, what: str) -> str:
        self.active.setdefault(ctx.idempotency_key, what)  # a retried command books nothing twice
        return ctx.idempotency_key

    def cancel(self, ref: str) -> None:
        what = self.active.pop(ref, None)
        if what is not None:
            self.cancelled[ref] = what


def build_travel(bookings: Bookings) -> tuple[SagaCoordinator, list[App]]:
    """The trip saga on ``trip_service`` and its three providers."""
    trips = App("trip_service")
    flights = App("flight_service")
    hotels = App("hotel_service")
    cars = App("car_service")

    coordinator = SagaCoordinator(trips)
    coordinator.define_saga(
        "book_trip",
        [
            SagaStep("flight", "flight_service", "book_flight", "cancel_flight", retry_count=2, retry_delay=0.05),
            SagaStep(
                "hotel", "hotel_service", "book_hotel", "cancel_hotel", timeout=0.5, retry_count=2, retry_delay=0.05
            ),
            SagaStep("car", "car_service", "rent_car", "return_car", retry_count=2, retry_delay=0.05),
        ],
        deadline=60.0,
    )

    @flights.action("book_flight")
    async def book_flight(data: dict[str, Any], ctx: Context) -> dict[str, Any]:
        return {"flight_ref": bookings.book(ctx, f"flight to {data['city']}")}

    @flights.action("cancel_flight")
    async def cancel_flight(data: dict[str, Any]) -> None:
        bookings.cancel(data["flight_ref"])

    @hotels.action("book_hotel")
    async def book_hotel(data: dict[str, Any], ctx: Context) -> dict[str, Any]:
        if bookings.slow_hotel_once:
            bookings.slow_hotel_once = False
            await asyncio.sleep(1.0)  # past the step's timeout: this attempt counts as failed
        return {"hotel_ref": bookings.book(ctx, f"hotel in {data['city']}")}

    @hotels.action("cancel_hotel")
    async def cancel_hotel(data: dict[str, Any]) -> None:
        bookings.cancel(data["hotel_ref"])

    @cars.action("rent_car")
    async def rent_car(data: dict[str, Any], ctx: Context) -> dict[str, Any]:
        if bookings.cars_left.get(data["city"], 0) <= 0:
            raise SoldOut(f"no cars left in {data['city']}")
        if ctx.idempotency_key not in bookings.active:
            bookings.cars_left[data["city"]] -= 1
        return {"car_ref": bookings.book(ctx, f"car in {data['city']}")}

    @cars.action("return_car")
    async def return_car(data: dict[str, Any]) -> None:
        bookings.cancel(data["car_ref"])

    return coordinator, [trips, flights, hotels, cars]


TRIPS = ({"traveller": "Ada", "city": "Lisbon"}, {"traveller": "Grace", "city": "Reykjavik"})


async def run_trips(broker: str = "memory://", out: Callable[[str], None] = print) -> list[SagaResult]:
    """Book both trips; return their results."""
    bookings = Bookings()
    coordinator, apps = build_travel(bookings)
    results = []
    async with run_apps(*apps, broker=broker):
        for trip in TRIPS:
            result = await coordinator.start_saga("book_trip", trip, timeout=30)
            results.append(result)
            steps = ", ".join(f"{s.name}={s.status} ({s.attempts} attempts)" for s in result.steps)
            out(f"  {trip['traveller']} to {trip['city']}: {result.state.value}: {steps}")
    out(f"  bookings kept: {sorted(bookings.active.values())}")
    out(f"  bookings cancelled: {sorted(bookings.cancelled.values())}")
    return results


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    logging.getLogger("choreo.dispatcher").setLevel(logging.ERROR)
    asyncio.run(run_trips(sys.argv[1] if len(sys.argv) > 1 else "memory://"))
