"""Parallel steps: branches overlap, the group waits for every branch, failures compensate each success once."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Any

import pytest

from choreo import App, Context, Parallel, SagaCoordinator, SagaState, SagaStep
from choreo.errors import ConfigurationError
from choreo.testing import run_apps

FAST: dict[str, Any] = {"timeout": 3.0, "retry_count": 0}


def checkout(calls: Counter[str], times: dict[str, list[float]], *, fail: str | None, slow: float) -> App:
    """create_order, then Parallel(reserve_stock, authorise_payment), then ship; ``fail`` names an action that
    fails at once, every action of the group takes ``slow`` seconds otherwise."""
    shop = App("shop")
    SagaCoordinator(shop).define_saga(
        "checkout",
        [
            SagaStep("create_order", "shop", "create", "cancel", **FAST),
            Parallel(
                SagaStep("reserve_stock", "shop", "reserve", "release", **FAST),
                SagaStep("authorise_payment", "shop", "authorise", "void", **FAST),
            ),
            SagaStep("ship", "shop", "ship", None, **FAST),
        ],
    )

    def action(name: str, delay: float = 0.0) -> None:
        async def run(ctx: Context) -> dict[str, Any]:
            began = time.monotonic()
            if name == fail:
                calls[name] += 1
                raise RuntimeError(f"{name} refused")
            await asyncio.sleep(delay)
            calls[name] += 1
            times[name] = [began, time.monotonic()]
            return {name: ctx.idempotency_key}

        shop.action(name)(run)

    for name in ("create", "cancel", "release", "void", "ship"):
        action(name)
    action("reserve", slow)
    action("authorise", slow)
    return shop


def coordinator_of(app: App) -> SagaCoordinator:
    from choreo.saga.coordinator import coordinator_of as find

    found = find(app)
    assert found is not None
    return found


async def test_branches_run_at_once_and_the_group_completes(broker_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """Both branches overlap in time; the saga goes on once both succeeded; steps are listed by their names."""
    caplog.set_level(logging.INFO, logger="choreo.saga")
    calls: Counter[str] = Counter()
    times: dict[str, list[float]] = {}
    shop = checkout(calls, times, fail=None, slow=0.4)
    async with run_apps(shop, broker=broker_url, concurrency=8):
        result = await coordinator_of(shop).start_saga("checkout", {}, saga_id="P-1", timeout=20)
    assert result.state is SagaState.COMPLETED
    assert [(s.name, s.status) for s in result.steps] == [
        ("create_order", "succeeded"),
        ("reserve_stock", "succeeded"),
        ("authorise_payment", "succeeded"),
        ("ship", "succeeded"),
    ]
    (r_start, r_end), (a_start, a_end) = times["reserve"], times["authorise"]
    assert r_start < a_end and a_start < r_end  # they overlapped
    assert times["ship"][0] >= max(r_end, a_end)
    lines = [r.getMessage() for r in caplog.records if r.name == "choreo.saga"]
    assert "[SAGA-P-1] Running in parallel: reserve_stock, authorise_payment" in lines
    assert "[SAGA-P-1] Step 3/4: authorise_payment - COMPLETED" in lines


async def test_a_failed_branch_waits_for_the_running_one_then_compensates_each_success_once(
    broker_url: str,
) -> None:
    """T20: authorise_payment fails while reserve_stock is still running; the group waits for it, then
    compensates reserve_stock (it succeeded) and create_order, once each; the failed branch is not compensated."""
    calls: Counter[str] = Counter()
    times: dict[str, list[float]] = {}
    shop = checkout(calls, times, fail="authorise", slow=0.5)
    async with run_apps(shop, broker=broker_url, concurrency=8) as env:
        result = await coordinator_of(shop).start_saga("checkout", {}, saga_id="P-2", timeout=20)
        await env.settle(timeout=10)
        commands = [e.type.rsplit(".", 1)[1] for e in env.published() if e.type.startswith("saga.cmd.")]
    assert result.state is SagaState.COMPENSATED
    assert [(s.name, s.status) for s in result.steps] == [
        ("create_order", "compensated"),
        ("reserve_stock", "compensated"),
        ("authorise_payment", "failed"),
        ("ship", "pending"),
    ]
    assert result.error is not None and result.error["step"] == "authorise_payment"
    assert calls == Counter(create=1, reserve=1, authorise=1, release=1, cancel=1)
    assert commands.index("release") > commands.index("reserve") and commands[-1] == "cancel"
    assert "void" not in commands and "ship" not in commands


async def test_a_branch_that_succeeded_is_compensated_when_its_sibling_fails(broker_url: str) -> None:
    """The fast branch succeeds, the slow one fails: the fast one and the earlier step are compensated."""
    calls: Counter[str] = Counter()
    shop = checkout(calls, {}, fail="reserve", slow=0.0)
    async with run_apps(shop, broker=broker_url, concurrency=8):
        result = await coordinator_of(shop).start_saga("checkout", {}, saga_id="P-3", timeout=20)
    assert result.state is SagaState.COMPENSATED
    assert [s.status for s in result.steps] == ["compensated", "failed", "compensated", "pending"]
    assert calls["void"] == 1 and calls["cancel"] == 1 and calls["release"] == 0


def test_parallel_is_validated() -> None:
    """A group needs two SagaSteps; groups do not nest; branch names are unique in the saga."""
    step = SagaStep("a", "svc", "do_a")
    with pytest.raises(ConfigurationError, match="at least two"):
        Parallel(step)
    with pytest.raises(ConfigurationError, match="do not nest"):
        Parallel(step, Parallel(SagaStep("b", "svc", "do_b"), SagaStep("c", "svc", "do_c")))  # type: ignore[arg-type]
    shop = App("shop")
    with pytest.raises(ConfigurationError, match="duplicate step names a"):
        SagaCoordinator(shop).define_saga("s", [step, Parallel(SagaStep("a", "x", "y"), SagaStep("b", "x", "z"))])


async def test_a_branch_that_times_out_is_retried_then_fails_the_group_on_the_virtual_clock() -> None:
    """A silent branch costs its attempts of `timeout` each; the other branch and the earlier step are compensated."""
    from choreo.testing import SagaTestHarness

    shop = App("shop")
    SagaCoordinator(shop).define_saga(
        "checkout",
        [
            SagaStep("create_order", "orders", "create", "cancel"),
            Parallel(
                SagaStep("reserve_stock", "inventory", "reserve", "release"),
                SagaStep("authorise_payment", "payments", "authorise", "void", timeout=30.0, retry_count=1),
            ),
        ],
    )
    silent = App("payments")

    @silent.on_event("saga.cmd.payments.authorise")
    async def swallow(event: Any) -> None:
        """Takes the command, never replies."""

    async with SagaTestHarness(shop, silent) as harness:
        began = harness.clock()
        result = await harness.start_saga("checkout", {}, timeout=10)
        spent = harness.clock() - began
    assert result.state is SagaState.COMPENSATED
    assert result.step("authorise_payment").attempts == 2
    assert result.step("authorise_payment").error == {"type": "TimeoutError", "message": "no reply within 30.0s"}
    assert [result.step(n).status for n in ("create_order", "reserve_stock")] == ["compensated", "compensated"]
    # Two attempts of 30 s each (plus a backoff of about a second). Not bounded
    # above: once the saga has ended, the clock may jump to a leftover timer
    # before this task resumes; the attempts above say what was spent.
    assert spent >= 60


async def test_the_deadline_gives_up_on_running_branches_and_compensates() -> None:
    """Past the saga's deadline, branches still running are failed and the succeeded ones compensated."""
    from choreo.testing import SagaTestHarness

    shop = App("shop")
    SagaCoordinator(shop).define_saga(
        "checkout",
        [
            Parallel(
                SagaStep("reserve_stock", "inventory", "reserve", "release"),
                SagaStep("authorise_payment", "payments", "authorise", "void", timeout=None),
            )
        ],
        deadline=120.0,
    )
    silent = App("payments")

    @silent.on_event("saga.cmd.payments.authorise")
    async def swallow(event: Any) -> None:
        """Takes the command, never replies."""

    async with SagaTestHarness(shop, silent) as harness:
        result = await harness.start_saga("checkout", {}, timeout=10)
    assert result.state is SagaState.COMPENSATED
    assert result.step("authorise_payment").status == "failed"
    assert "deadline" in result.step("authorise_payment").error["message"]  # type: ignore[index]
    assert result.step("reserve_stock").status == "compensated"


def test_sweep_and_resume_of_a_running_group() -> None:
    """The machine: a sweep fails only overdue branches; a resume resends every waiting branch with new tokens."""
    from choreo.saga import SagaDefinition
    from choreo.saga.machine import SagaRun
    from choreo.saga.record import new_record

    definition = SagaDefinition.build(
        "g",
        [
            Parallel(
                SagaStep("a", "svc", "do_a", "undo_a", timeout=10.0, retry_count=0),
                SagaStep("b", "svc", "do_b", "undo_b", timeout=100.0, retry_count=0),
            )
        ],
    )
    record = new_record(definition, "G-1", {}, 0.0)
    outs = SagaRun(definition, record, 0.0, lambda i, line: None).start()
    assert sorted(o.type for o in outs if o.type.startswith("saga.cmd.")) == ["saga.cmd.svc.do_a", "saga.cmd.svc.do_b"]
    assert record.due_at == 10.0
    tokens = {s.name: s.wait["token"] for s in record.steps if s.wait}  # type: ignore[index]
    resent = SagaRun(definition, record, 1.0, lambda i, line: None).resume()
    assert len([o for o in resent if o.type.startswith("saga.cmd.")]) == 2
    assert all(s.wait["token"] != tokens[s.name] for s in record.steps if s.wait)  # type: ignore[index]
    assert [s.attempts for s in record.steps] == [1, 1]  # a resend is not a new attempt
    SagaRun(definition, record, 50.0, lambda i, line: None).on_timer({"kind": "sweep", "token": record.token})
    assert [s.status for s in record.steps] == ["failed", "running"]  # only a was overdue; b still runs
    assert record.state is SagaState.RUNNING and record.due_at is not None
