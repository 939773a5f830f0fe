"""Handler parameters annotated with attrs classes, on both brokers: the
annotation wins over the parameter's name, ``data`` included.

This module has ``from __future__ import annotations``, so every annotation
below reaches the router as a string.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs
import pytest

from choreo import App, Event
from choreo.routing import inspect_params
from choreo.testing import run_apps

if TYPE_CHECKING:
    from choreo import Context


@attrs.frozen
class OrderPlaced:
    order_id: str
    total: float
    gift: bool = False


async def test_data_annotated_with_an_attrs_class_receives_the_model(broker_url: str) -> None:
    """``data: OrderPlaced`` receives OrderPlaced built from the payload, extra keys ignored."""
    app = App("shop")
    got: list[Any] = []

    @app.on_event("order.placed")
    async def take(data: OrderPlaced) -> None:
        got.append(data)

    async with run_apps(app, broker=broker_url) as env:
        await env.publish("order.placed", {"order_id": "O-1", "total": 3, "coupon": "X"})
        await env.settle()
    assert got == [OrderPlaced("O-1", 3.0)]


@pytest.mark.parametrize(
    ("payload", "named"),
    [({"total": 1.0}, "order_id"), ({"order_id": "O-1", "total": "lots"}, "total")],
    ids=["missing", "mistyped"],
)
async def test_invalid_payload_for_data_is_dead_lettered_at_once_naming_the_field(
    broker_url: str, payload: dict[str, Any], named: str
) -> None:
    """Data that does not fit the model named by ``data``'s annotation: one attempt, a dead letter naming it."""
    app = App("shop")
    calls: list[OrderPlaced] = []

    @app.on_event("order.placed", retries=3, retry_delay=0.01)
    async def take(data: OrderPlaced) -> None:
        calls.append(data)

    async with run_apps(app, broker=broker_url) as env:
        await env.publish("order.placed", payload)
        await env.publish("order.placed", {"order_id": "O-2", "total": 1})
        await env.settle()
    assert calls == [OrderPlaced("O-2", 1.0)]
    [dead] = env.dead_letters()
    assert named in dead.reason and "invalid payload" in dead.reason


async def test_models_beside_unresolvable_annotations_and_injected_names(broker_url: str) -> None:
    """A model parameter still gets its model when another annotation names a
    type imported only for type checkers; ``event``, ``ctx`` and plain
    ``data: dict`` keep their injected values, in a sync handler too."""
    app = App("shop")
    seen: list[tuple[Any, ...]] = []

    @app.on_event("order.placed")
    async def take(order: OrderPlaced, ctx: Context, event: Event, data: dict[str, Any]) -> None:
        seen.append((order, ctx.correlation_id, event.type, data))

    @app.on_event("order.placed", name="take_sync")
    def take_sync(data: OrderPlaced, saga_id: str | None) -> None:
        seen.append((data, saga_id))

    async with run_apps(app, broker=broker_url) as env:
        root = await env.publish("order.placed", {"order_id": "O-1", "total": 2.5, "gift": True})
        await env.settle()
    model = OrderPlaced("O-1", 2.5, True)
    assert sorted(seen, key=len) == [
        (model, None),
        (model, root.correlation_id, "order.placed", {"order_id": "O-1", "total": 2.5, "gift": True}),
    ]


def test_string_annotations_resolve_one_by_one() -> None:
    """Explicit string annotations resolve in the handler's module, each on its own."""

    def handler(data: "OrderPlaced", ctx: "Undefined", other: "OrderPlaced") -> None:  # type: ignore[name-defined]  # noqa: F821, UP037
        pass

    params = inspect_params(handler)
    assert [(p.name, p.source, p.model) for p in params] == [
        ("data", "model", OrderPlaced),
        ("ctx", "ctx", None),
        ("other", "model", OrderPlaced),
    ]
