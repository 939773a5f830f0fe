"""The saga examples run, as scripts and on each broker, and the choreography compensates."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from choreo import SagaState
from choreo.testing import run_apps

ROOT = Path(__file__).resolve().parent.parent


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(name: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / f"{name}.py")], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_order_saga_example_runs_as_a_script() -> None:
    """`python examples/order_saga.py` completes one order, compensates the other, in both styles."""
    output = run_script("order_saga")
    assert "[SAGA-order-O-2002] Compensating: release_inventory" in output
    assert "O-2001: completed" in output and "O-2002: compensated" in output
    assert "O-2001: confirmed" in output and "O-2002: rejected" in output


def test_travel_saga_example_runs_as_a_script() -> None:
    """`python examples/travel_saga.py` books one trip and unwinds the other."""
    output = run_script("travel_saga")
    assert "Ada to Lisbon: completed" in output and "Grace to Reykjavik: compensated" in output
    assert "Compensating: cancel_hotel" in output


async def test_orchestrated_order_example_on_each_broker(broker_url: str) -> None:
    """The orchestrated order saga gives the same outcomes on memory and Redis."""
    outcomes = await load("order_saga").run_orchestrated(broker_url, out=lambda line: None)
    assert outcomes == {"O-2001": SagaState.COMPLETED, "O-2002": SagaState.COMPENSATED}


async def test_travel_example_on_each_broker(broker_url: str) -> None:
    """The travel saga survives a hotel timeout and compensates a trip with no car, on each broker."""
    first, second = await load("travel_saga").run_trips(broker_url, out=lambda line: None)
    assert first.state is SagaState.COMPLETED and first.step("hotel").attempts == 2
    assert second.state is SagaState.COMPENSATED
    assert [s.status for s in second.steps] == ["compensated", "compensated", "failed"]


async def test_choreographed_order_flow_compensates(broker_url: str) -> None:
    """A declined payment triggers the @compensates handler that releases the stock, then the order is rejected."""
    example = load("order_saga")
    ledger = example.Ledger()
    async with run_apps(*example.build_choreographed(ledger), broker=broker_url) as env:
        await env.publish("order.placed", {"order_id": "O-9", "sku": "SKU-2", "quantity": 2, "total": 900.0})
        await env.settle(timeout=10)
        flow = [e.type for e in env.published()]
        assert env.dead_letters() == []
    assert flow == ["order.placed", "stock.reserved", "payment.declined", "stock.released", "order.rejected"]
    assert ledger.stock["SKU-2"] == 3
