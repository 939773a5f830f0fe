"""Nothing left behind: every success reply a saga does not keep is compensated, once per reply."""

from __future__ import annotations

import asyncio
from typing import Any

from choreo import App, Context, SagaCoordinator, SagaState, SagaStep
from choreo.testing import run_apps


class Hotel:
    """An idempotent provider, as in examples/travel_saga.py: one booking per key, cancel by reference."""

    def __init__(self, slow: float, slow_times: int | None = None) -> None:
        self.active: dict[str, str] = {}
        self.calls: list[str] = []
        self.slow, self.slow_times = slow, slow_times

    def app(self) -> App:
        hotels = App("hotel_service")

        @hotels.action("book_hotel")
        async def book_hotel(data: dict[str, Any], ctx: Context) -> dict[str, Any]:
            if self.slow_times is None or self.slow_times > 0:
                if self.slow_times is not None:
                    self.slow_times -= 1
                await asyncio.sleep(self.slow)
            self.calls.append("book")
            self.active.setdefault(ctx.idempotency_key, data["city"])  # a repeated command books nothing twice
            return {"hotel_ref": ctx.idempotency_key}

        @hotels.action("cancel_hotel")
        async def cancel_hotel(data: dict[str, Any]) -> None:
            self.calls.append("cancel")
            self.active.pop(data["hotel_ref"], None)  # tolerates a booking that is not there

        @hotels.action("pay")
        async def pay(data: dict[str, Any]) -> None:
            raise RuntimeError("card declined")

        return hotels


async def wait_for(condition: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def test_every_late_success_of_a_compensated_saga_is_undone(broker_url: str) -> None:
    """A step that always answers after its timeout ends COMPENSATED with no booking left:
    each late success (one per attempt) gets its own compensation."""
    hotel = Hotel(slow=0.5)
    trips = App("trip_service")
    SagaCoordinator(trips).define_saga(
        "trip",
        [
            SagaStep(
                "hotel", "hotel_service", "book_hotel", "cancel_hotel", timeout=0.2, retry_count=1, retry_delay=0.05
            )
        ],
    )
    async with run_apps(trips, hotel.app(), broker=broker_url) as env:
        result = await trips_coordinator(trips).start_saga("trip", {"city": "Lisbon"}, saga_id="late-1", timeout=10)
        await wait_for(lambda: hotel.calls.count("book") == 2 and hotel.calls.count("cancel") == 2)
        await env.settle(timeout=10)
        stored = await trips_coordinator(trips).get_saga_state("late-1")
        assert env.dead_letters() == []
    assert result.state is SagaState.COMPENSATED
    assert result.step("hotel").status == "failed" and result.step("hotel").attempts == 2
    assert hotel.active == {}
    assert sorted(hotel.calls) == ["book", "book", "cancel", "cancel"]
    assert stored.state is SagaState.COMPENSATED


async def test_a_late_success_while_the_retry_runs_is_the_same_effect_and_is_kept(broker_url: str) -> None:
    """The first attempt answers late while the retry runs; the retry succeeds; a later step fails:
    the booking (one, by its key) is compensated exactly once and nothing is left."""
    hotel = Hotel(slow=0.4, slow_times=1)
    trips = App("trip_service")
    SagaCoordinator(trips).define_saga(
        "trip",
        [
            SagaStep(
                "hotel", "hotel_service", "book_hotel", "cancel_hotel", timeout=0.2, retry_count=1, retry_delay=0.3
            ),
            SagaStep("pay", "hotel_service", "pay", None, timeout=1.0, retry_count=0),
        ],
    )
    async with run_apps(trips, hotel.app(), broker=broker_url) as env:
        result = await trips_coordinator(trips).start_saga("trip", {"city": "Oslo"}, saga_id="late-2", timeout=10)
        await env.settle(timeout=10)
    assert result.state is SagaState.COMPENSATED
    assert result.step("hotel").status == "compensated" and result.step("hotel").attempts == 2
    assert hotel.active == {}
    assert hotel.calls == ["book", "book", "cancel"]


def trips_coordinator(app: App) -> SagaCoordinator:
    from choreo.saga.coordinator import coordinator_of

    coordinator = coordinator_of(app)
    assert coordinator is not None
    return coordinator


def test_a_redelivered_late_reply_is_compensated_once() -> None:
    """The machine undoes each late success once: the same reply again sends nothing."""
    from choreo.saga import SagaDefinition
    from choreo.saga.machine import SagaRun
    from choreo.saga.record import new_record

    definition = SagaDefinition.build(
        "trip", [SagaStep("hotel", "hotel_service", "book_hotel", "cancel_hotel", timeout=0.2, retry_count=0)]
    )
    record = new_record(definition, "S-1", {}, 0.0)
    SagaRun(definition, record, 0.0, lambda i, line: None).start()
    token = record.token
    SagaRun(definition, record, 1.0, lambda i, line: None).on_timer({"kind": "step", "token": token})
    assert record.state is SagaState.COMPENSATED
    reply = {"step": "hotel", "kind": "action", "token": token, "attempt": 1, "outcome": "succeeded", "result": {}}
    first = SagaRun(definition, record, 2.0, lambda i, line: None).on_reply(dict(reply))
    again = SagaRun(definition, record, 3.0, lambda i, line: None).on_reply(dict(reply))
    assert [o.type for o in first] == ["saga.cmd.hotel_service.cancel_hotel"] and again == []
    assert record.steps[0].late == "compensating"
    done = {"step": "hotel", "kind": "late_compensation", "token": -1, "outcome": "succeeded"}
    SagaRun(definition, record, 4.0, lambda i, line: None).on_reply(done)
    assert record.steps[0].late == "compensated" and record.state is SagaState.COMPENSATED
