"""T12: a coordinator killed with SIGKILL at each crash point; another finishes every saga.

The coordinator runs as a real subprocess on Redis (short leases, so the
survivor reclaims the dead one's deliveries quickly); the participants run
here and count every call by idempotency key, the ledger the checks read.
The saga records are in the broker's state keys, or in PostgreSQL
(``PostgresStateStore``) for both coordinators.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
import pytest

from choreo import App, Context
from choreo.testing import run_apps
from tests.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
SAGAS = 20


def participants(calls: Counter[str], gate: asyncio.Event | None = None) -> App:
    """The saga's participants; with ``gate``, every action waits for it first."""
    app = App("fault_participants")

    def action(name: str, fail: bool = False) -> None:
        async def run(data: dict[str, Any], ctx: Context) -> dict[str, Any]:
            if gate is not None:
                await gate.wait()
            calls[ctx.idempotency_key] += 1
            if fail and data["decline"]:
                raise ValueError("declined")
            return {name: "done"}

        app.action(name)(run)

    for name in ("create_order", "cancel_order", "reserve_stock", "release_stock", "refund"):
        action(name)
    action("charge", fail=True)
    return app


def coordinator(url: str, *args: str, shape: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """The coordinator process; ``shape`` adds to its environment (``SAGA_SHAPE``, ``SAGA_STATE`` ...)."""
    return subprocess.Popen(
        [sys.executable, "-m", "tests.apps.saga_crash", url, *args],
        cwd=ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(shape or {})},
    )


def stop(process: subprocess.Popen[str]) -> None:
    if process.stdout is not None:
        process.stdout.close()
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def wait_exit(process: subprocess.Popen[str], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while process.poll() is None:
        assert time.monotonic() < deadline, "the coordinator did not reach its crash point"
        await asyncio.sleep(0.05)
    return process.returncode


#: How the saga is defined in the killed coordinator, and in the survivor.
SHAPES = {
    "sequential": ({}, {}),
    "parallel": ({"SAGA_SHAPE": "parallel"}, {"SAGA_SHAPE": "parallel"}),
    # Version 2 (parallel) deployed beside version 1 while version 1 sagas are in flight.
    "versions": ({"SAGA_SHAPE": "versions", "SAGA_VERSIONS": "1"}, {"SAGA_SHAPE": "versions", "SAGA_VERSIONS": "1,2"}),
}


async def broker_records(env: Any) -> list[dict[str, Any]]:
    return [json.loads(v.value) for v in (await env.broker.list_state("saga:")).values()]


def postgres_records(database_url: str) -> list[dict[str, Any]]:
    with psycopg.connect(database_url) as conn:
        return [record for (record,) in conn.execute("SELECT record FROM choreo_sagas").fetchall()]


@pytest.mark.parametrize(
    ("shape", "crash_at", "nth", "state"),
    [
        ("sequential", "after_command", 7, "broker"),
        ("sequential", "after_reply", 7, "broker"),
        ("sequential", "during_compensation", 2, "broker"),
        ("parallel", "after_command", 7, "broker"),
        ("parallel", "after_reply", 7, "broker"),
        ("parallel", "during_compensation", 2, "broker"),
        ("versions", "after_reply", 7, "broker"),
        ("sequential", "after_command", 7, "postgres"),
        ("sequential", "after_reply", 7, "postgres"),
        ("sequential", "during_compensation", 2, "postgres"),
    ],
)
async def test_killed_coordinator_sagas_all_finish_with_effects_once(
    request: pytest.FixtureRequest, redis_server: RedisServer, shape: str, crash_at: str, nth: int, state: str
) -> None:
    """Every saga ends COMPLETED or COMPENSATED after the coordinator is killed, each effect called once;
    the same with reserve and pay as a Parallel group, with version 2 deployed in the survivor, and with
    the saga records in PostgreSQL (killed after a transition's commit, before its relay published)."""
    redis_server.command("FLUSHALL")
    url = redis_server.url + "?visibility_timeout=1"
    first_shape, survivor_shape = SHAPES[shape]
    database_url = ""
    if state == "postgres":
        database_url = request.getfixturevalue("database_url")
        on_postgres = {"SAGA_STATE": "postgres", "CHOREO_DATABASE_URL": database_url}
        first_shape, survivor_shape = {**first_shape, **on_postgres}, {**survivor_shape, **on_postgres}
    calls: Counter[str] = Counter()
    first = survivor = None
    try:
        # Participants hold every command until the first coordinator has started
        # all sagas and armed its crash point, so the point is reached however
        # the machine schedules the two processes.
        gate = asyncio.Event()
        async with run_apps(participants(calls, gate), broker=url) as env:
            first = coordinator(url, str(SAGAS), crash_at, str(nth), shape=first_shape)
            assert first.stdout is not None
            assert (await asyncio.to_thread(first.stdout.readline)).strip() == "started"
            gate.set()
            assert await wait_exit(first, 90) == -signal.SIGKILL
            survivor = coordinator(url, shape=survivor_shape)
            deadline = time.monotonic() + 90
            while True:
                if state == "postgres":
                    records = await asyncio.to_thread(postgres_records, database_url)
                else:
                    records = await broker_records(env)
                if len(records) == SAGAS and all(r["state"] in ("completed", "compensated", "failed") for r in records):
                    break
                assert time.monotonic() < deadline, Counter(r["state"] for r in records)
                await asyncio.sleep(0.1)
            if state == "postgres":
                assert await broker_records(env) == []  # in PostgreSQL, not in the broker's state keys
    finally:
        for process in (first, survivor):
            if process is not None:
                stop(process)
    states = {r["saga_id"]: r["state"] for r in records}
    assert {r.get("version", 1) for r in records} == {1}
    for i in range(SAGAS):
        saga = f"s-{i}"
        if i % 4 == 0:
            assert states[saga] == "compensated"
            expected = [
                "create:create_order",
                "reserve:reserve_stock",
                "pay:charge",
                "reserve:release_stock",
                "create:cancel_order",
            ]
        else:
            assert states[saga] == "completed"
            expected = ["create:create_order", "reserve:reserve_stock", "pay:charge"]
        assert {key: calls[f"{saga}:{key}"] for key in expected} == dict.fromkeys(expected, 1), saga
    assert "pay:refund" not in " ".join(calls)
