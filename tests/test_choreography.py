"""The choreography core end to end, on both brokers: what handlers emit,
how failures turn into retries, failure events and dead letters, and how ids
propagate."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import attrs
import pytest

from choreo import App, Emit, Event
from choreo.testing import run_apps


def make_app(name: str = "svc") -> App:
    return App(name)


async def test_returned_dict_emits_first_declared_event_merged_over_incoming(broker_url: str) -> None:
    """A returned dict emits the first declared event with {**incoming, **returned}."""
    app = make_app()

    @app.on_event("order.created")
    @app.emits("inventory.reserved", "inventory.insufficient")
    async def reserve(data: dict[str, Any]) -> dict[str, Any]:
        return {"reservation_id": "R-1", "qty": 2}

    async with run_apps(app, broker=broker_url) as env:
        await env.publish("order.created", {"order_id": "O-1", "qty": 1})
        await env.settle()
    [reserved] = env.published("inventory.reserved")
    assert reserved.data == {"order_id": "O-1", "qty": 2, "reservation_id": "R-1"}
    assert env.published("inventory.insufficient") == []


async def test_returning_none_emits_incoming_data_unchanged(broker_url: str) -> None:
    """Returning None still emits the success event, carrying the incoming data."""
    app = make_app()

    @app.emits("b.done")
    @app.on_event("a.done")
    async def step(data: dict[str, Any]) -> None:
        return None

    async with run_apps(app, broker=broker_url) as env:
        await env.publish("a.done", {"k": 1})
        await env.settle()
    assert [e.data for e in env.published("b.done")] == [{"k": 1}]


async def test_emit_picks_a_declared_event_and_lists_emit_several(broker_url: str) -> None:
    """Emit selects which declared event goes out; a list of Emit sends each."""
    app = make_app()

    @app.on_event("order.created")
    @app.emits("inventory.reserved", "inventory.insufficient", "audit.logged")
    async def reserve(data: dict[str, Any]) -> Any:
        if data["qty"] > 5:
            return Emit("inventory.insufficient", {"missing": data["qty"] - 5})
        return [Emit("inventory.reserved"), Emit("audit.logged", {"note": "ok"})]

    async with run_apps(app, broker=broker_url) as env:
        await env.publish("order.created", {"qty": 9})
        await env.publish("order.created", {"qty": 1})
        await env.settle()
    assert [e.data for e in env.published("inventory.insufficient")] == [{"qty": 9, "missing": 4}]
    assert [e.data for e in env.published("inventory.reserved")] == [{"qty": 1}]
    assert [e.data for e in env.published("audit.logged")] == [{"qty": 1, "note": "ok"}]


async def test_undeclared_emit_dead_letters_at_once_and_publishes_nothing(broker_url: str) -> None:
    """Emitting an undeclared event is a programming error: one attempt, a dead letter naming it."""
    app = make_app()
    calls = []

    @app.on_event("order.created", retries=5, retry_delay=0.01)
    @app.emits("inventory.reserved")
    async def reserve(data: dict[str, Any]) -> Emit:
        calls.append(1)
        return Emit("inventory.vanished")

    async with run_apps(app, broker=broker_url) as env:
        await env.publish("order.created", {})
        await env.settle()
    assert len(calls) == 1
    assert [e.type for e in env.published()] == ["order.created"]
    [dead] = env.dead_letters()
    assert "EmitNotDeclared" in dead.reason and "inventory.vanished" in dead.reason
    assert dead.group == "svc.reserve" and dead.event is not None and dead.event.type == "order.created"
    assert "order.created" in str(dead)


async def test_terminal_handler_ignores_its_return_value_but_not_an_emit(broker_url: str) -> None:
    """Without @emits a handler is terminal: a dict is ignored, an Emit is undeclared."""
    app = make_app()

    @app.on_event("a.happened")
    async def quiet(data: dict[str, Any]) -> dict[str, Any]:
        return {"ignored": True}

    @app.on_event("b.happened")
    async def loud(data: dict[str, Any]) -> Emit:
        return Emit("c.happened")

    async with run_apps(app, broker=broker_url) as env:
        await env.publish("a.happened", {})
        await env.publish("b.happened", {})
        await env.settle()
    assert [e.type for e in env.published()] == ["a.happened", "b.happened"]
    [dead] = env.dead_letters()
    assert "c.happened" in dead.reason and "terminal" in dead.reason


async def test_failure_after_retries_emits_second_declared_event_with_error(broker_url: str) -> None:
    """Once retries are spent the second declared event carries the incoming data and the error."""
    app = make_app()
    attempts: list[int] = []

    class CardDeclined(Exception):
        pass

    @app.on_event("payment.requested", retries=2, retry_delay=0.01)
    @app.emits("payment.completed", "payment.failed")
    async def charge(data: dict[str, Any], event: Event) -> dict[str, Any]:
        attempts.append(event.attempt)
        raise CardDeclined("insufficient funds")

    async with run_apps(app, broker=broker_url) as env:
        published = await env.publish("payment.requested", {"amount": 5})
        await env.settle()
    assert attempts == [1, 2, 3]
    [failed] = env.published("payment.failed")
    assert failed.data["amount"] == 5
    assert failed.data["error"] == {
        "type": f"{CardDeclined.__module__}.{CardDeclined.__qualname__}",
        "message": "insufficient funds",
    }
    assert failed.causation_id == published.id
    assert env.dead_letters() == []


async def test_retry_keeps_event_id_and_succeeds_on_a_later_attempt(broker_url: str) -> None:
    """A retry is the same event (same id) with attempt + 1; success then emits once."""
    app = make_app()
    seen: list[tuple[str, int]] = []

    @app.on_event("job.queued", retries=3, retry_delay=0.01)
    @app.emits("job.done")
    async def work(event: Event) -> None:
        seen.append((event.id, event.attempt))
        if event.attempt < 3:
            raise ConnectionError("flaky")

    async with run_apps(app, broker=broker_url) as env:
        root = await env.publish("job.queued", {})
        await env.settle()
    assert seen == [(root.id, 1), (root.id, 2), (root.id, 3)]
    assert len(env.published("job.done")) == 1


async def test_failure_without_failure_event_is_dead_lettered_with_reason(broker_url: str) -> None:
    """With no second declared event, a failure past its retries goes to the dead-letter stream."""
    app = make_app()

    @app.on_event("job.queued", retries=1, retry_delay=0.01)
    async def work(data: dict[str, Any]) -> None:
        raise RuntimeError("disk full")

    async with run_apps(app, broker=broker_url) as env:
        await env.publish("job.queued", {"n": 1})
        await env.settle()
    [dead] = env.dead_letters()
    assert "disk full" in dead.reason and "2 attempts" in dead.reason
    assert dead.attempts == 2
    assert dead.event is not None and dead.event.data == {"n": 1}


async def test_timeout_is_a_failed_attempt(broker_url: str) -> None:
    """A handler exceeding its timeout fails that attempt; the failure event says so."""
    app = make_app()

    @app.on_event("slow.requested", retries=1, retry_delay=0.01, timeout=0.05)
    @app.emits("slow.done", "slow.timed_out")
    async def slow(data: dict[str, Any]) -> None:
        await asyncio.sleep(10)

    async with run_apps(app, broker=broker_url) as env:
        await env.publish("slow.requested", {})
        await env.settle()
    [failed] = env.published("slow.timed_out")
    assert failed.data["error"]["type"] == "builtins.TimeoutError"
    assert env.published("slow.done") == []


async def test_sync_handler_runs_in_a_worker_thread(broker_url: str) -> None:
    """Plain functions are run off the event loop."""
    app = make_app()
    threads = []

    @app.on_event("a.happened")
    @app.emits("b.happened")
    def blocking(data: dict[str, Any]) -> dict[str, Any]:
        threads.append(threading.current_thread())
        return {"sync": True}

    async with run_apps(app, broker=broker_url) as env:
        await env.publish("a.happened", {})
        await env.settle()
    assert threads and threads[0] is not threading.main_thread()
    assert env.published("b.happened")[0].data == {"sync": True}


async def test_every_handler_sees_every_event_in_its_own_group(broker_url: str) -> None:
    """Two services (and two handlers of one) on one event type each get every event."""
    billing, audit = App("billing"), App("audit")
    seen: list[str] = []

    @billing.on_event("order.created")
    async def bill(data: dict[str, Any]) -> None:
        seen.append(f"bill:{data['n']}")

    @audit.on_event("order.created")
    async def record(data: dict[str, Any]) -> None:
        seen.append(f"record:{data['n']}")

    @audit.on_event("order.created", name="record_twice")
    async def record_again(data: dict[str, Any]) -> None:
        seen.append(f"again:{data['n']}")

    async with run_apps(billing, audit, broker=broker_url) as env:
        for n in range(3):
            await env.publish("order.created", {"n": n})
        await env.settle()
    assert sorted(seen) == sorted(f"{p}:{n}" for p in ("bill", "record", "again") for n in range(3))
    assert {r.group for r in audit.routes} == {"audit.record", "audit.record_twice"}


async def test_correlation_and_causation_ids_propagate_through_a_chain(broker_url: str) -> None:
    """Every emitted event keeps the root's correlation id and names its cause."""
    app = make_app()

    @app.on_event("a.happened")
    @app.emits("b.happened")
    async def one(data: dict[str, Any]) -> None: ...

    @app.on_event("b.happened")
    @app.emits("c.happened")
    async def two(correlation_id: str, saga_id: str | None) -> dict[str, Any]:
        return {"seen_correlation": correlation_id, "seen_saga": saga_id}

    async with run_apps(app, broker=broker_url) as env:
        root = await env.publish("a.happened", {}, correlation_id="corr-1", saga_id="saga-9")
        await env.settle()
    [b] = env.published("b.happened")
    [c] = env.published("c.happened")
    assert root.correlation_id == b.correlation_id == c.correlation_id == "corr-1"
    assert (b.causation_id, c.causation_id) == (root.id, b.id)
    assert c.saga_id == "saga-9" and c.data == {"seen_correlation": "corr-1", "seen_saga": "saga-9"}


async def test_new_root_event_gets_a_fresh_correlation_id(broker_url: str) -> None:
    """A root event without ids starts its own transaction."""
    async with run_apps(broker=broker_url) as env:
        first = await env.publish("x.happened", {})
        second = await env.publish("x.happened", {})
    assert first.correlation_id == first.id and second.correlation_id == second.id
    assert first.id < second.id or first.id[:10] == second.id[:10]


async def test_ctx_carries_ids_attempt_and_a_stable_idempotency_key(broker_url: str) -> None:
    """ctx exposes the event's ids and an idempotency key that survives retries."""
    app = make_app()
    keys: list[str] = []

    @app.on_event("job.queued", retries=1, retry_delay=0.01)
    async def work(ctx: Any) -> None:
        keys.append(ctx.idempotency_key)
        ctx.logger.info("attempt %d", ctx.attempt)
        if ctx.attempt == 1:
            raise ValueError("again")

    async with run_apps(app, broker=broker_url) as env:
        root = await env.publish("job.queued", {})
        await env.settle()
    assert len(keys) == 2 and keys[0] == keys[1] and root.id in keys[0]


@attrs.frozen
class Shipment:
    order_id: str
    weight: float
    express: bool = False


async def test_attrs_parameter_is_built_from_matching_payload_keys(broker_url: str) -> None:
    """A parameter annotated with an attrs class receives it, extra keys ignored."""
    app = make_app()
    got: list[Shipment] = []

    @app.on_event("shipment.requested")
    async def ship(shipment: Shipment) -> None:
        got.append(shipment)

    async with run_apps(app, broker=broker_url) as env:
        await env.publish("shipment.requested", {"order_id": "O-1", "weight": 2, "colour": "red"})
        await env.settle()
    assert got == [Shipment("O-1", 2.0)]


@pytest.mark.parametrize(
    ("payload", "named"),
    [({"weight": 1.0}, "order_id"), ({"order_id": "O-1", "weight": "heavy"}, "weight")],
    ids=["missing", "mistyped"],
)
async def test_invalid_attrs_payload_is_dead_lettered_naming_the_field(
    broker_url: str, payload: dict[str, Any], named: str
) -> None:
    """A missing or mistyped field is a validation error: one attempt, a dead letter naming it."""
    app = make_app()
    calls = []

    @app.on_event("shipment.requested", retries=3)
    async def ship(shipment: Shipment) -> None:
        calls.append(shipment)

    async with run_apps(app, broker=broker_url) as env:
        await env.publish("shipment.requested", payload)
        await env.publish("shipment.requested", {"order_id": "O-2", "weight": 1})
        await env.settle()
    assert calls == [Shipment("O-2", 1.0)]
    [dead] = env.dead_letters()
    assert named in dead.reason and "invalid payload" in dead.reason


async def test_delayed_publish_is_handled_after_the_delay(broker_url: str) -> None:
    """publish(delay=...) makes the event due later; settle waits for it."""
    app = make_app()
    handled: list[float] = []

    @app.on_event("reminder.due")
    async def remind(data: dict[str, Any]) -> None:
        handled.append(asyncio.get_running_loop().time())

    async with run_apps(app, broker=broker_url) as env:
        start = asyncio.get_running_loop().time()
        await env.publish("reminder.due", {}, delay=0.3)
        await env.settle()
    assert handled and handled[0] - start >= 0.25


async def test_handler_concurrency_limits_parallel_attempts(broker_url: str) -> None:
    """concurrency=2 never runs more than two attempts of the handler at once."""
    app = make_app()
    running = 0
    peak = 0

    @app.on_event("job.queued", concurrency=2)
    async def work(data: dict[str, Any]) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.02)
        running -= 1

    async with run_apps(app, broker=broker_url) as env:
        for n in range(8):
            await env.publish("job.queued", {"n": n})
        await env.settle()
    assert peak == 2


async def test_stop_drains_in_flight_handlers_before_returning(broker_url: str) -> None:
    """Leaving run_apps lets a running handler finish and commit what it emits."""
    app = make_app()
    started = asyncio.Event()

    @app.on_event("slow.requested")
    @app.emits("slow.done")
    async def slow(data: dict[str, Any]) -> None:
        started.set()
        await asyncio.sleep(0.2)

    async with run_apps(broker=broker_url) as observer:
        async with run_apps(app, broker=observer.broker) as env:
            await env.publish("slow.requested", {})
            await asyncio.wait_for(started.wait(), 5)
        assert env.runtime.in_flight == 0
        backlog = await observer.broker.backlog(env.runtime.subscriptions)
        assert all(b.idle for b in backlog)


class SwallowsOneCancel:
    """A broker whose lease renewal drops the cancellation that reaches it and
    returns normally, as ``asyncio.wait_for`` does on Python 3.11 when its inner
    call completes in the same loop iteration (redis-py uses it for socket timeouts)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.swallowed = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def extend_many(self, deliveries: Any) -> list[bool]:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.swallowed += 1
        return [True] * len(deliveries)


async def test_stop_ends_even_when_a_cancellation_is_swallowed(broker_url: str) -> None:
    """A worker past its grace period exits although a library dropped the first
    cancel of its lease renewal; the cut-off delivery is handled by the next worker."""
    import brokers
    from choreo import run

    url = broker_url + ("&" if "?" in broker_url else "?") + "visibility_timeout=0.6"
    app = make_app()
    started = asyncio.Event()
    release = asyncio.Event()
    done: list[str] = []

    @app.on_event("stuck.requested")
    async def stuck(event: Event) -> None:
        started.set()
        await release.wait()
        done.append(event.id)

    inner = brokers.from_url(url)
    await inner.connect()
    try:
        broker = SwallowsOneCancel(inner)
        async with asyncio.timeout(15) as guard:  # against a hang, not a speed check
            async with run(app, broker=broker, grace=0.1) as runtime:  # type: ignore[arg-type]
                event = await runtime.publish("stuck.requested", {})
                await asyncio.wait_for(started.wait(), 5)
                await asyncio.sleep(0.5)  # the renewal loop is now inside extend_many()
        assert not guard.expired(), "stop() hung"
        assert broker.swallowed == 1
        assert done == []
        release.set()
        async with run(app, broker=inner):
            async with asyncio.timeout(15):
                while done != [event.id]:
                    await asyncio.sleep(0.05)
    finally:
        await inner.close()
