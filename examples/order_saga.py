"""The e-commerce order, twice: orchestrated by a saga, and choreographed.

Run it: ``python examples/order_saga.py [broker-url]`` (in memory by default).

Orchestrated: ``order_service`` holds a ``SagaCoordinator`` that runs four
steps across four services. One order goes through; the next one's card is
declined (and so is the backup method), so the saga releases the stock and
cancels the order, in reverse order.

Choreographed: the same services react to each other's events; nobody
orchestrates. ``@app.compensates`` declares which failure undoes which step.

Every participant applies its effect once per ``ctx.idempotency_key``, so a
redelivered command (a crash, a timeout retry) changes nothing twice.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Any

from choreo import App, Context, Emit, SagaCoordinator, SagaState, SagaStep
from choreo.testing import run_apps

CARD_LIMIT = 500.0


class PaymentDeclined(Exception):
    """The card issuer said no."""


class Ledger:
    """What the services did, one entry per idempotency key."""

    def __init__(self) -> None:
        self.effects: dict[str, str] = {}
        self.stock = {"SKU-1": 10, "SKU-2": 3}

    def once(self, ctx: Context, what: str) -> bool:
        """Record ``what`` under the key; False if it was done already."""
        if ctx.idempotency_key in self.effects:
            return False
        self.effects[ctx.idempotency_key] = what
        return True


def build_orchestrated(ledger: Ledger) -> tuple[SagaCoordinator, list[App]]:
    """The order saga: a coordinator on ``order_service`` and its participants."""
    orders = App("order_service")
    inventory = App("inventory_service")
    payments = App("payment_service")
    notifications = App("notification_service")

    coordinator = SagaCoordinator(orders)
    coordinator.define_saga(
        "order_processing",
        [
            SagaStep("create_order", "order_service", "create_order", "cancel_order", timeout=10.0, retry_count=3),
            SagaStep("reserve_inventory", "inventory_service", "reserve_inventory", "release_inventory"),
            SagaStep(
                "process_payment",
                "payment_service",
                "charge_card",
                "refund_card",
                fallback="charge_backup_method",
                retry_count=1,
                retry_delay=0.05,
            ),
            SagaStep("send_email", "notification_service", "send_confirmation", None, compensatable=False),
        ],
    )

    @orders.action("create_order")
    async def create_order(data: dict[str, Any], ctx: Context) -> dict[str, Any]:
        ledger.once(ctx, f"order {data['order_id']} created")
        return {"status": "created"}

    @orders.action("cancel_order")
    async def cancel_order(data: dict[str, Any], ctx: Context) -> dict[str, Any]:
        ledger.once(ctx, f"order {data['order_id']} cancelled")
        return {"status": "cancelled"}

    @inventory.action("reserve_inventory")
    async def reserve_inventory(data: dict[str, Any], ctx: Context) -> dict[str, Any]:
        if ledger.once(ctx, f"reserved {data['quantity']} x {data['sku']}"):
            if ledger.stock[data["sku"]] < data["quantity"]:
                raise ValueError(f"only {ledger.stock[data['sku']]} of {data['sku']} left")
            ledger.stock[data["sku"]] -= data["quantity"]
        return {"reservation_id": f"R-{data['order_id']}"}

    @inventory.action("release_inventory")
    async def release_inventory(data: dict[str, Any], ctx: Context) -> None:
        if ledger.once(ctx, f"released {data['quantity']} x {data['sku']}"):
            ledger.stock[data["sku"]] += data["quantity"]

    @payments.action("charge_card")
    async def charge_card(data: dict[str, Any], ctx: Context) -> dict[str, Any]:
        if data["total"] > CARD_LIMIT:
            raise PaymentDeclined(f"card declined for {data['total']:.2f}")
        ledger.once(ctx, f"charged {data['total']:.2f}")
        return {"payment_id": f"PAY-{data['order_id']}"}

    @payments.action("charge_backup_method")
    async def charge_backup_method(data: dict[str, Any]) -> dict[str, Any]:
        raise PaymentDeclined("no backup payment method on file")

    @payments.action("refund_card")
    async def refund_card(data: dict[str, Any], ctx: Context) -> None:
        ledger.once(ctx, f"refunded {data['payment_id']}")

    @notifications.action("send_confirmation")
    async def send_confirmation(data: dict[str, Any], ctx: Context) -> dict[str, Any]:
        ledger.once(ctx, f"emailed confirmation of {data['order_id']}")
        return {"confirmation_sent": True}

    return coordinator, [orders, inventory, payments, notifications]


def build_choreographed(ledger: Ledger) -> list[App]:
    """The same order as a choreography: each service reacts to the last event."""
    orders = App("order_service")
    inventory = App("inventory_service")
    payments = App("payment_service")

    @inventory.on_event("order.placed")
    @inventory.emits("stock.reserved", "stock.unavailable")
    async def reserve_stock(data: dict[str, Any], ctx: Context) -> dict[str, Any] | Emit:
        if ledger.stock[data["sku"]] < data["quantity"]:
            return Emit("stock.unavailable", {"reason": "out of stock"})
        if ledger.once(ctx, f"reserved {data['quantity']} x {data['sku']}"):
            ledger.stock[data["sku"]] -= data["quantity"]
        return {"reservation_id": f"R-{data['order_id']}"}

    @payments.on_event("stock.reserved", retries=1, retry_delay=0.01)
    @payments.emits("payment.captured", "payment.declined")
    async def capture_payment(data: dict[str, Any]) -> dict[str, Any]:
        if data["total"] > CARD_LIMIT:
            raise PaymentDeclined(f"card declined for {data['total']:.2f}")
        return {"payment_id": f"PAY-{data['order_id']}"}

    @inventory.compensates(reserve_stock, on="payment.declined")
    @inventory.emits("stock.released")
    async def release_stock(data: dict[str, Any], ctx: Context) -> None:
        if ledger.once(ctx, f"released {data['quantity']} x {data['sku']}"):
            ledger.stock[data["sku"]] += data["quantity"]

    @orders.on_event("payment.captured")
    @orders.emits("order.confirmed")
    async def confirm_order(data: dict[str, Any]) -> None:
        return None

    @orders.on_event("stock.released", name="reject_after_release")
    @orders.on_event("stock.unavailable", name="reject_for_stock")
    @orders.emits("order.rejected")
    async def reject_order(data: dict[str, Any]) -> dict[str, Any]:
        return {"status": "rejected"}

    return [orders, inventory, payments]


ORDERS = (
    {"order_id": "O-2001", "sku": "SKU-1", "quantity": 2, "total": 49.90},
    {"order_id": "O-2002", "sku": "SKU-2", "quantity": 1, "total": 1250.00},
)


async def run_orchestrated(broker: str = "memory://", out: Callable[[str], None] = print) -> dict[str, SagaState]:
    """Run both orders through the order saga; return each one's final state."""
    ledger = Ledger()
    coordinator, apps = build_orchestrated(ledger)
    outcomes = {}
    async with run_apps(*apps, broker=broker):
        for order in ORDERS:
            result = await coordinator.start_saga(
                "order_processing", order, saga_id=f"order-{order['order_id']}", timeout=30
            )
            outcomes[order["order_id"]] = result.state
            steps = ", ".join(f"{s.name}={s.status}" for s in result.steps)
            out(f"  {order['order_id']}: {result.state.value} ({steps})")
    out(f"  stock afterwards: {ledger.stock}")
    return outcomes


async def run_choreographed(broker: str = "memory://", out: Callable[[str], None] = print) -> dict[str, str]:
    """Run both orders through the choreography; return each one's outcome."""
    ledger = Ledger()
    async with run_apps(*build_choreographed(ledger), broker=broker) as env:
        for order in ORDERS:
            await env.publish("order.placed", order)
        await env.settle(timeout=30)
        outcomes = {e.data["order_id"]: "confirmed" for e in env.published("order.confirmed")}
        outcomes.update({e.data["order_id"]: "rejected" for e in env.published("order.rejected")})
    for order_id, outcome in sorted(outcomes.items()):
        out(f"  {order_id}: {outcome}")
    out(f"  stock afterwards: {ledger.stock}")
    return outcomes


async def main(broker: str = "memory://", out: Callable[[str], None] = print) -> None:
    out(f"orchestrated order saga on {broker}")
    await run_orchestrated(broker, out)
    out(f"choreographed order saga on {broker}")
    await run_choreographed(broker, out)


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    logging.getLogger("choreo.dispatcher").setLevel(logging.ERROR)
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "memory://"))
