"""Systems for ``choreo check`` and ``choreo graph``: one clean, one whose
failure event nobody handles."""

from __future__ import annotations

from typing import Any

from choreo import App

# -- clean: every failure handled, one entry, terminals at the end -----------
orders = App("order_service")
payments = App("payment_service")


@orders.on_event("order.placed")
@orders.emits("order.confirmed", "order.refused")
async def confirm_order(data: dict[str, Any]) -> None:
    return None


@payments.on_event("order.confirmed")
@payments.emits("payment.captured", "payment.declined")
async def capture_payment(data: dict[str, Any]) -> None:
    return None


@orders.on_event("payment.declined")
@orders.emits("order.cancelled")
async def cancel_order(data: dict[str, Any]) -> None:
    return None


@orders.on_event("order.refused")
async def tell_customer(data: dict[str, Any]) -> None:
    return None


clean = [orders, payments]

# -- broken: shipping.failed is emitted and nobody handles it ----------------
shipping = App("shipping_service")


@shipping.on_event("payment.captured")
@shipping.emits("shipping.scheduled", "shipping.failed")
async def schedule_shipping(data: dict[str, Any]) -> None:
    return None


broken = [orders, payments, shipping]
