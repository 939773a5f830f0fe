"""``choreo trace``: one transaction rebuilt from the streams, in causal order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from choreo.cli import app
from choreo.demo import build_order_apps
from choreo.testing import run_apps
from choreo.trace import collect, render_mermaid, render_tree
from tests.redis_server import RedisServer
from tests.test_graph import parse_mermaid
from tests.worker_process import WorkerProcess, choreo, wait_until

runner = CliRunner()


async def test_in_process_trace_shows_the_failure_path_under_the_handler_that_took_each_event() -> None:
    apps = build_order_apps()
    async with run_apps(*apps) as env:
        declined = await env.publish("order.created", {"order_id": "O-9", "sku": "SKU-2", "quantity": 1,
                                                       "total": 1250.0})
        await env.publish("order.created", {"order_id": "O-8", "sku": "SKU-1", "quantity": 1, "total": 5.0})
        await env.settle(timeout=10)
        trace = await collect(env.broker, declined.correlation_id, apps=apps)
    assert [e.type for e in trace.events] == [
        "order.created", "inventory.reserved", "payment.failed", "inventory.released", "order.cancelled"
    ]
    tree = render_tree(trace)
    assert "payment_service.charge_card: failed" in tree
    assert tree.index("payment_service.charge_card") < tree.index("payment.failed")
    assert "O-8" not in tree and "shipping" not in tree  # the other transaction is not mixed in
    _, links, directives = parse_mermaid(render_mermaid(trace))
    assert len(links) == 4
    assert any(d.startswith("linkStyle 1 ") for d in directives)  # the failed edge


@pytest.mark.redis
def test_trace_command_reads_a_transaction_back_from_redis(redis_server: RedisServer, tmp_path: Path) -> None:
    redis_server.command("FLUSHALL")
    url = redis_server.url
    ledger = tmp_path / "ledger"
    worker = WorkerProcess("tests.apps.shop:app", "tests.apps.flaky:app", "--broker", url).start()
    try:
        published = choreo("publish", "order.created", json.dumps({"order_id": "O-1", "ledger": str(ledger)}),
                           "--broker", url)
        correlation = published.stdout.split("correlation_id=")[1].strip()
        choreo("publish", "invoice.requested", json.dumps({"invoice_id": "I-1", "ledger": str(ledger),
                                                           "fixed_marker": "/none"}),
               "--broker", url, "--correlation-id", correlation)
        wait_until(lambda: ledger.exists() and len(ledger.read_text().splitlines()) == 2, message="handled")
        wait_until(lambda: "billing" in choreo("dlq", "list", "--broker", url).stdout, message="dead letter")
    finally:
        assert worker.terminate() == 0, worker.output
    result = runner.invoke(app, ["trace", correlation, "--broker", url, "--app", "tests.apps.shop:app"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"correlation {correlation}: 3 events")
    assert lines[1].startswith("order.created")
    assert "shop.accept_order: success" in lines[2]
    assert "order.accepted" in lines[3]
    assert "shop.notify: success" in lines[4]
    assert any("billing.send_invoice: dead lettered" in line and "billing provider is not configured" in line
               for line in lines)
    mermaid = runner.invoke(app, ["trace", correlation, "--broker", url, "--format", "mermaid"])
    assert mermaid.exit_code == 0, mermaid.output
    nodes, _, _ = parse_mermaid(mermaid.stdout)
    assert len(nodes) == 4  # three events and the dead letter
    missing = runner.invoke(app, ["trace", "01ABCDEFGHJKMNPQRSTVWXYZ00", "--broker", url])
    assert missing.exit_code == 1
    assert "no events with correlation id" in missing.stderr
