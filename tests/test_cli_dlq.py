"""``choreo dlq``: list, show, replay (after the cause is fixed) and purge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from choreo.cli import app
from tests.redis_server import RedisServer
from tests.worker_process import WorkerProcess, choreo, wait_until

pytestmark = pytest.mark.redis

runner = CliRunner()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    redis_server.command("FLUSHALL")
    return redis_server.url


def dlq(*args: str) -> list[dict[str, str]]:
    result = runner.invoke(app, ["dlq", *args])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_replay_reruns_a_dead_letter_after_its_cause_is_fixed(redis_url: str, tmp_path: Path) -> None:
    """A handler with no retries and no failure event dead-letters; once the
    cause is fixed, `dlq replay` runs it again and the dead letter is gone."""
    ledger, marker = tmp_path / "ledger", tmp_path / "fixed"
    worker = WorkerProcess("tests.apps.flaky:app", "--broker", redis_url).start()
    try:
        payload = json.dumps({"invoice_id": "I-1", "ledger": str(ledger), "fixed_marker": str(marker)})
        assert choreo("publish", "invoice.requested", payload, "--broker", redis_url).returncode == 0
        wait_until(lambda: len(dlq("list", "--json", "--broker", redis_url)) == 1, message="dead letter")
        [letter] = dlq("list", "--json", "--broker", redis_url)
        assert letter["topic"] == "invoice.requested"
        assert letter["group"] == "billing.send_invoice"
        assert "MissingConfiguration" in letter["reason"]

        shown = runner.invoke(app, ["dlq", "show", letter["id"], "--broker", redis_url])
        assert shown.exit_code == 0, shown.output
        assert "billing provider is not configured" in shown.stdout
        assert '"invoice_id": "I-1"' in shown.stdout

        marker.touch()  # the cause is fixed
        replayed = runner.invoke(app, ["dlq", "replay", letter["id"], "--broker", redis_url])
        assert replayed.exit_code == 0, replayed.output
        assert "replayed 1 dead letter(s)" in replayed.stdout
        wait_until(lambda: ledger.exists() and ledger.read_text() == "invoiced I-1\n", message="re-run")
        assert dlq("list", "--json", "--broker", redis_url) == []
    finally:
        assert worker.terminate() == 0, worker.output


def test_replay_all_and_purge(redis_url: str, tmp_path: Path) -> None:
    """--all replays every dead letter with a count; purge deletes them."""
    worker = WorkerProcess("tests.apps.flaky:app", "--broker", redis_url).start()
    try:
        for n in range(3):
            payload = json.dumps({"invoice_id": f"I-{n}", "ledger": str(tmp_path / "l"), "fixed_marker": "/none"})
            assert choreo("publish", "invoice.requested", payload, "--broker", redis_url).returncode == 0
        wait_until(lambda: len(dlq("list", "--json", "--broker", redis_url)) == 3, message="3 dead letters")
        result = runner.invoke(app, ["dlq", "replay", "--all", "--broker", redis_url])
        assert result.exit_code == 0, result.output
        assert "replayed 3 dead letter(s)" in result.stdout
        # Still broken: they come back.
        wait_until(lambda: len(dlq("list", "--json", "--broker", redis_url)) == 3, message="dead again")
        result = runner.invoke(app, ["dlq", "purge", "--yes", "--broker", redis_url])
        assert result.exit_code == 0, result.output
        assert "purged 3 dead letter(s)" in result.stdout
        assert runner.invoke(app, ["dlq", "list", "--broker", redis_url]).stdout.strip() == "no dead letters"
    finally:
        assert worker.terminate() == 0, worker.output


def test_unknown_ids_and_bad_arguments_are_one_line_errors(redis_url: str) -> None:
    result = runner.invoke(app, ["dlq", "show", "1-1", "--broker", redis_url])
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: no dead letter with id '1-1'"
    result = runner.invoke(app, ["dlq", "replay", "1-1", "--broker", redis_url])
    assert result.exit_code == 1
    assert "no dead letter with id 1-1" in result.stderr
    result = runner.invoke(app, ["dlq", "replay", "--broker", redis_url])
    assert result.exit_code == 2
    assert "give dead letter ids or --all" in result.stderr


def test_unreachable_broker_is_one_line_error() -> None:
    result = choreo("dlq", "list", "--broker", "redis://127.0.0.1:1/0")
    assert result.returncode == 1
    assert result.stderr.startswith("error: ")
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
