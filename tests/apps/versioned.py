"""The order saga in two versions, for the deploy gate (``choreo check --broker``).

``app`` defines version 2 only (version 1 was dropped); ``app_both`` keeps
version 1 beside version 2, as a deploy should until version 1 sagas end.
"""

from __future__ import annotations

from choreo import App, SagaCoordinator, SagaStep

V1 = [SagaStep("reserve", "stock", "reserve", "release"), SagaStep("charge", "payments", "charge", "refund")]
V2 = [SagaStep("charge", "payments", "charge", "refund"), SagaStep("reserve", "stock", "reserve", "release")]

app = App("shop")
SagaCoordinator(app, sweep_interval=None).define_saga("order", V2, version=2)

app_both = App("shop")
both = SagaCoordinator(app_both, sweep_interval=None)
both.define_saga("order", V1, version=1)
both.define_saga("order", V2, version=2)

stock = App("stock")
payments = App("payments")


@stock.action("reserve")
async def reserve() -> None: ...


@stock.action("release")
async def release() -> None: ...


@payments.action("charge")
async def charge() -> None: ...


@payments.action("refund")
async def refund() -> None: ...
