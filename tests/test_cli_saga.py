"""``choreo saga list|status|resume`` on a real Redis."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import choreo
from choreo.cli import app
from choreo.saga import SagaResult, SagaState
from tests.apps import trip
from tests.redis_server import RedisServer

pytestmark = pytest.mark.redis

runner = CliRunner()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    redis_server.command("FLUSHALL")
    return redis_server.url


def test_a_failed_saga_is_listed_shown_and_resumed_after_its_cause_is_fixed(redis_url: str, tmp_path: Path) -> None:
    marker = tmp_path / "fixed"

    async def fail_a_trip() -> SagaResult:
        async with choreo.run(trip.app, broker=redis_url):
            return await trip.coordinator.start_saga("trip", {"fixed_marker": str(marker)}, saga_id="T-1", timeout=10)

    assert asyncio.run(fail_a_trip()).state is SagaState.FAILED

    listed = runner.invoke(app, ["saga", "list", "--state", "failed", "--json", "--broker", redis_url])
    assert listed.exit_code == 0, listed.output
    [row] = [json.loads(line) for line in listed.stdout.splitlines()]
    assert row["saga_id"] == "T-1" and row["name"] == "trip" and row["state"] == "failed" and row["version"] == "1"

    status = runner.invoke(app, ["saga", "status", "T-1", "tests.apps.trip:app", "--broker", redis_url])
    assert status.exit_code == 0, status.output
    assert "state:  failed" in status.stdout
    assert "name:   trip (version 1)" in status.stdout and "correlation: T-1" in status.stdout
    lines = {line.split()[0]: line.split() for line in status.stdout.splitlines()[4:]}
    assert lines["book_hotel"][1] == "compensation_failed"
    assert lines["book_hotel"][6] == "1" and "provider is down" in " ".join(lines["book_hotel"][8:])
    assert lines["pay"][1] == "failed"

    marker.touch()  # the provider is back
    resumed = runner.invoke(app, ["saga", "resume", "T-1", "tests.apps.trip:app", "--wait", "--timeout", "10",
                                  "--broker", redis_url])
    assert resumed.exit_code == 0, resumed.output
    assert "saga T-1 resumed: compensated" in resumed.stdout
    assert runner.invoke(app, ["saga", "list", "--state", "failed", "--broker", redis_url]).stdout.strip() == (
        "no sagas in state failed"
    )


def test_unknown_saga_and_state_are_one_line_errors(redis_url: str) -> None:
    result = runner.invoke(app, ["saga", "status", "nope", "--broker", redis_url])
    assert result.exit_code == 1
    assert result.stderr == "error: no saga 'nope'\n"
    result = runner.invoke(app, ["saga", "list", "--state", "sleepy", "--broker", redis_url])
    assert result.exit_code == 2
    assert "unknown saga state 'sleepy'" in result.stderr
    result = runner.invoke(app, ["saga", "resume", "nope", "tests.apps.shop:app", "--broker", redis_url])
    assert result.exit_code == 2
    assert "none of the given apps has a SagaCoordinator" in result.stderr
