"""A saga coordinator process that kills itself (SIGKILL) at a named crash point.

``python -m tests.apps.saga_crash URL [COUNT CRASH_AT N]``: runs the
``order_service`` coordinator on URL; with COUNT, first starts sagas ``s-0`` ..
``s-<COUNT-1>`` (every fourth one's payment is declined); with CRASH_AT,
kills itself the Nth time it reaches that point:

- ``after_command``: right after committing a transition that published a command;
- ``after_reply``: holding a participant's reply, before committing its transition;
- ``during_compensation``: before committing a transition that sends a compensation.

The participants run elsewhere (the test process). ``SAGA_SHAPE`` in the
environment picks the saga's definition: ``sequential`` (the default), or
``parallel`` (reserve and pay as one ``Parallel`` group), or ``versions``
(version 1 sequential; with ``SAGA_VERSIONS=1,2`` also version 2 parallel,
so sagas started on version 1 finish on it after version 2 is deployed).

``SAGA_STATE=postgres`` keeps the saga records in PostgreSQL
(``PostgresStateStore`` on ``CHOREO_DATABASE_URL``) instead of the broker's
state keys. A transition is then a database commit and its commands go out
through the outbox relay, so the points sit on the store's writes:
``after_command`` is after the commit, before the relay publishes;
``after_reply`` and ``during_compensation`` are before the commit.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from brokers import Delivery, Message
from choreo import App, Parallel, SagaCoordinator, SagaStep, run
from choreo.postgres import PostgresStateStore

SAGA = "fault_order"
orders = App("order_service")
STORE = PostgresStateStore() if os.environ.get("SAGA_STATE") == "postgres" else None
coordinator = SagaCoordinator(orders, sweep_interval=1.0, state_store=STORE)
# No step timeouts: a killed coordinator's sagas are finished by the
# survivor's redelivery and sweeper, and a declined charge is final.
_POLICY: dict[str, Any] = {"timeout": None, "retry_count": 0}
_CREATE = SagaStep("create", "fault_participants", "create_order", "cancel_order", **_POLICY)
_RESERVE = SagaStep("reserve", "fault_participants", "reserve_stock", "release_stock", **_POLICY)
_PAY = SagaStep("pay", "fault_participants", "charge", "refund", **_POLICY)
SHAPE = os.environ.get("SAGA_SHAPE", "sequential")
if SHAPE == "parallel":
    coordinator.define_saga(SAGA, [_CREATE, Parallel(_RESERVE, _PAY)])
elif SHAPE == "versions":
    for version in (int(v) for v in os.environ.get("SAGA_VERSIONS", "1").split(",")):
        steps = [_CREATE, _RESERVE, _PAY] if version == 1 else [_CREATE, Parallel(_RESERVE, _PAY)]
        coordinator.define_saga(SAGA, steps, version=version)
else:
    coordinator.define_saga(SAGA, [_CREATE, _RESERVE, _PAY])


def _kinds(messages: Sequence[Message]) -> set[str]:
    kinds = set()
    for message in messages:
        if message.topic.startswith("saga.cmd."):
            kinds.add(json.loads(message.body).get("headers", {}).get("saga_kind", ""))
    return kinds


def _hitter(nth: int) -> Callable[[], bool]:
    seen = [0]

    def hit() -> bool:
        seen[0] += 1
        return seen[0] == nth

    return hit


def arm(runtime: Any, crash_at: str, nth: int) -> None:
    if STORE is not None:
        arm_store(STORE, crash_at, nth)
        return
    broker = runtime.broker
    original = broker.commit
    hit = _hitter(nth)

    async def commit(delivery: Delivery | None = None, **effects: Any) -> Any:
        kinds = _kinds(effects.get("publish", ()))
        if crash_at == "after_reply" and delivery is not None and delivery.topic.startswith("saga.reply.") and hit():
            os.kill(os.getpid(), signal.SIGKILL)
        if crash_at == "during_compensation" and "compensation" in kinds and hit():
            os.kill(os.getpid(), signal.SIGKILL)
        status = await original(delivery, **effects)
        if crash_at == "after_command" and kinds & {"action", "compensation"} and hit():
            os.kill(os.getpid(), signal.SIGKILL)
        return status

    broker.commit = commit


def arm_store(store: PostgresStateStore, crash_at: str, nth: int) -> None:
    """The crash points on PostgreSQL saga state: around the store's transition writes."""
    save, save_in = store.save, store.save_in
    hit = _hitter(nth)

    def crash(before: bool, kinds: set[str], reply: bool) -> None:
        if before and crash_at == "after_reply" and reply and hit():
            os.kill(os.getpid(), signal.SIGKILL)
        if before and crash_at == "during_compensation" and "compensation" in kinds and hit():
            os.kill(os.getpid(), signal.SIGKILL)
        if not before and crash_at == "after_command" and kinds & {"action", "compensation"} and hit():
            os.kill(os.getpid(), signal.SIGKILL)

    async def save_wrapped(runtime: Any, saga_id: str, version: int, record: Any, events: Any) -> Any:
        kinds = {event.headers.get("saga_kind", "") for event, _ in events}
        crash(True, kinds, False)
        status = await save(runtime, saga_id, version, record, events)
        crash(False, kinds, False)
        return status

    async def save_in_wrapped(ctx: Any, saga_id: str, version: int, record: Any, outs: Any) -> Any:
        kinds = {(out.headers or {}).get("saga_kind", "") for out in outs}
        reply = ctx.event.type.startswith("saga.reply.")
        crash(True, kinds, reply)
        emits = await save_in(ctx, saga_id, version, record, outs)
        crash(False, kinds, reply)
        return emits

    store.save = save_wrapped  # type: ignore[method-assign]
    store.save_in = save_in_wrapped  # type: ignore[method-assign]


async def main(url: str, count: int, crash_at: str | None, nth: int) -> None:
    async with run(orders, broker=url, grace=1.0) as runtime:
        for i in range(count):
            await coordinator.start_saga(SAGA, {"n": i, "decline": i % 4 == 0}, saga_id=f"s-{i}", wait=False)
        if crash_at:
            arm(runtime, crash_at, nth)
        print("started", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    args = sys.argv[1:]
    asyncio.run(
        main(
            args[0],
            int(args[1]) if len(args) > 1 else 0,
            args[2] if len(args) > 2 else None,
            int(args[3]) if len(args) > 3 else 1,
        )
    )
