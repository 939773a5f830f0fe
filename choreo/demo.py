"""``choreo demo``: an e-commerce order choreography, run in memory.

Four services react to each other's events; nobody orchestrates. One order goes
through; the other is declined at payment, and the failure path releases the
reserved stock and cancels the order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from choreo.app import App
from choreo.events import Event
from choreo.middleware import Middleware
from choreo.routing import Emit
from choreo.testing import run_apps

__all__ = ("build_order_apps", "run_demo")


class PaymentDeclined(Exception):
    """The card issuer said no."""


def build_order_apps(card_limit: float = 500.0) -> list[App]:
    """The order choreography: order, inventory, payment and shipping services."""
    orders = App("order_service")
    inventory = App("inventory_service")
    payments = App("payment_service")
    shipping = App("shipping_service")
    stock = {"SKU-1": 10, "SKU-2": 3}

    @inventory.on_event("order.created")
    @inventory.emits("inventory.reserved", "inventory.insufficient")
    async def reserve_inventory(data: dict[str, Any]) -> dict[str, Any] | Emit:
        if stock.get(data["sku"], 0) < data["quantity"]:
            return Emit("inventory.insufficient", {"reason": f"only {stock.get(data['sku'], 0)} left"})
        stock[data["sku"]] -= data["quantity"]
        return {"reservation_id": f"R-{data['order_id']}"}

    @payments.on_event("inventory.reserved", retries=1, retry_delay=0.01)
    @payments.emits("payment.completed", "payment.failed")
    async def charge_card(data: dict[str, Any]) -> dict[str, Any]:
        if data["total"] > card_limit:
            raise PaymentDeclined(f"card declined for {data['total']:.2f}")
        return {"payment_id": f"PAY-{data['order_id']}"}

    @shipping.on_event("payment.completed")
    @shipping.emits("shipping.scheduled", "shipping.failed")
    async def schedule_shipment(data: dict[str, Any]) -> dict[str, Any]:
        return {"tracking": f"TRK-{data['order_id']}"}

    @inventory.on_event("payment.failed")
    @inventory.emits("inventory.released")
    async def release_inventory(data: dict[str, Any]) -> dict[str, Any]:
        stock[data["sku"]] += data["quantity"]  # compensation: undo the reservation
        return {}

    @orders.on_event("shipping.scheduled")
    @orders.emits("order.completed")
    async def complete_order(data: dict[str, Any]) -> None:
        return None

    @orders.on_event("inventory.insufficient", name="cancel_for_stock")
    @orders.on_event("inventory.released", name="cancel_after_release")
    @orders.on_event("shipping.failed", name="cancel_for_shipping")
    @orders.emits("order.cancelled")
    async def cancel_order(data: dict[str, Any]) -> dict[str, Any]:
        return {"status": "cancelled"}

    return [orders, inventory, payments, shipping]


class _FlowPrinter(Middleware):
    def __init__(self, out: Callable[[str], None]) -> None:
        self.out = out

    def on_publish(self, event: Event) -> None:
        detail = {k: v for k, v in event.data.items() if k in ("order_id", "total", "error", "reason", "tracking")}
        if "error" in detail:
            detail["error"] = detail["error"]["message"]
        shown = " ".join(f"{k}={v}" for k, v in detail.items())
        self.out(f"[{event.correlation_id[-8:]}] {event.type:<24} {shown}")


async def run_demo(broker: str = "memory://", out: Callable[[str], None] = print) -> dict[str, str]:
    """Run two orders through the choreography; return each order's outcome."""
    apps = build_order_apps()
    out(f"choreo demo: order choreography across {len(apps)} services on {broker}")
    async with run_apps(*apps, broker=broker, middleware=[_FlowPrinter(out)]) as env:
        await env.publish("order.created", {"order_id": "O-1001", "sku": "SKU-1", "quantity": 2, "total": 49.90})
        await env.publish("order.created", {"order_id": "O-1002", "sku": "SKU-2", "quantity": 1, "total": 1250.00})
        await env.settle(timeout=10)
        outcomes = {e.data["order_id"]: "completed" for e in env.published("order.completed")}
        outcomes.update({e.data["order_id"]: "cancelled" for e in env.published("order.cancelled")})
        out("")
        out(f"summary: {len(env.published())} events, {len(env.dead_letters())} dead letters")
        for order_id, outcome in sorted(outcomes.items()):
            out(f"  {order_id}: {outcome}")
    example = _order_saga_example()
    if example is not None:
        out("")
        out(f"the same orders as an orchestrated saga (examples/order_saga.py) on {broker}")
        await example.run_orchestrated(broker, out)
    return outcomes


def _order_saga_example() -> Any:
    """``examples/order_saga.py`` of this checkout, or ``None`` when installed without it."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "order_saga.py"
    spec = importlib.util.spec_from_file_location("choreo_example_order_saga", path)
    if spec is None or spec.loader is None or not path.exists():
        return None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
