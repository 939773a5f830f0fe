"""Filling a broker with what the dashboard shows: a few real transactions
and sagas run by the lab apps, or thousands of saga records and dead letters
written straight through the broker contract."""

from __future__ import annotations

import time
from typing import Any

from brokers import Broker, Message, StateWrite, Subscription
from choreo.saga.definition import SagaState, StepStatus
from choreo.saga.record import SagaRecord, StepRecord
from choreo.saga.store import KEY_PREFIX
from choreo.testing import TestEnv
from tests.apps import dashboard_lab as lab

HOSTILE = "<script>window.pwned=1</script><img src=x onerror=\"window.pwned=2\">"


async def run_lab(env: TestEnv) -> dict[str, Any]:
    """Two orders (one paid, one declined), a hostile audit request that is
    dead-lettered, and three sagas: completed, compensated, failed."""
    paid = await env.publish("order.created", {"order_id": "O-1", "sku": "SKU-1", "quantity": 1, "total": 20})
    await env.publish("order.created", {"order_id": "O-2", "sku": "SKU-1", "quantity": 1, "total": 2000})
    audit = await env.publish("audit.requested", {"note": HOSTILE})
    completed = await lab.coordinator.start_saga("checkout", {"total": 10}, timeout=10)
    compensated = await lab.coordinator.start_saga("checkout", {"total": 500, "customer": HOSTILE}, timeout=10)
    failed = await lab.coordinator.start_saga("trip", {"total": 500}, timeout=10)
    await env.settle(timeout=10)
    return {"paid": paid, "audit": audit, "completed": completed, "compensated": compensated, "failed": failed}


def record(saga_id: str, created_at: float, *, name: str = "bulk", state: SagaState = SagaState.COMPLETED,
           due_at: float | None = None) -> SagaRecord:
    status = StepStatus.SUCCEEDED if state is SagaState.COMPLETED else StepStatus.RUNNING
    steps = [StepRecord("first", status, 1, None, created_at, created_at + 0.01), StepRecord("second")]
    return SagaRecord(saga_id, name, steps, {"n": saga_id}, created_at, created_at + 0.02, state=state, due_at=due_at,
                      attempt=1)


async def write_records(broker: Broker, records: list[SagaRecord], prefix: str = KEY_PREFIX) -> None:
    for start in range(0, len(records), 500):
        writes = [StateWrite(prefix + r.saga_id, r.to_json(), 0) for r in records[start:start + 500]]
        await broker.commit(state=writes)


async def write_raw_records(broker: Broker, raw: dict[str, str], prefix: str = KEY_PREFIX) -> None:
    await broker.commit(state=[StateWrite(prefix + key, value.encode(), 0) for key, value in raw.items()])


async def stuck_saga(broker: Broker) -> SagaRecord:
    """A saga still RUNNING a minute after its command timed out."""
    now = time.time()
    stuck = record("S-stuck", now - 120, name="checkout", state=SagaState.RUNNING, due_at=now - 60)
    await write_records(broker, [stuck])
    return stuck


async def dead_letters(broker: Broker, count: int, topic: str = "bulk.failed") -> None:
    """``count`` dead letters of ``topic``'s group ``bulk.handler``, as a consumer giving up makes them."""
    subscription = Subscription(topic, "bulk.handler")
    await broker.subscribe([subscription])
    for start in range(0, count, 500):
        await broker.publish([Message(topic, f"m-{n}", f'{{"n": {n}}}'.encode())
                              for n in range(start, min(count, start + 500))])
    done = 0
    while done < count:
        deliveries = await broker.fetch("bulk-consumer", [subscription], limit=500, timeout=1)
        for delivery in deliveries:
            await broker.commit(delivery, dead_letter=f"bulk failure {delivery.message_id}")
        done += len(deliveries)
