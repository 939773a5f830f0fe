"""The dashboard's JSON API and its rules, on every broker, against a real
uvicorn server: the same data as the pages, paging through thousands of
sagas and dead letters, older saga records, hostile strings escaped, and
replay or purge refused without --allow-actions or without the token."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from choreo.dashboard import create_app, database_query, redact
from choreo.errors import ConfigurationError
from choreo.saga.definition import SagaState
from choreo.testing import TestEnv
from tests.apps import dashboard_lab as lab
from tests.dashboard_seed import HOSTILE, dead_letters, record, run_lab, stuck_saga, write_raw_records, write_records
from tests.dashboard_support import LiveSystem, request
from tests.redis_server import RedisServer, free_port

ROOT = Path(__file__).resolve().parent.parent
V1 = json.loads((ROOT / "tests" / "fixtures" / "saga_records_v1.json").read_text())


@pytest.fixture(autouse=True)
def audit_broken() -> None:
    lab.FIXED["audit"] = False


def test_api_gives_the_data_of_every_page(broker_url: str) -> None:
    """Sagas (filtered, newest first, stuck ones flagged), one saga, one
    transaction, dead letters and the flow come back as JSON."""
    with LiveSystem(broker_url, lab.build_apps()) as live:
        ran = live.call(run_lab)
        live.call(lambda env: stuck_saga(env.broker))
        status, page = live.get("/api/sagas")
        assert status == 200
        assert [s["saga_id"] for s in page["sagas"]] == [
            ran["failed"].saga_id, ran["compensated"].saga_id, ran["completed"].saga_id, "S-stuck"]
        assert page["counts"] == {"pending": 0, "running": 1, "completed": 1, "compensating": 0, "compensated": 1,
                                  "failed": 1}
        flagged = {s["saga_id"]: s["stuck"] for s in page["sagas"] if s["stuck"]}
        assert set(flagged) == {ran["failed"].saga_id, "S-stuck"}
        assert "past its timeout" in flagged["S-stuck"]
        _, failed = live.get("/api/sagas?state=FAILED")
        assert [s["saga_id"] for s in failed["sagas"]] == [ran["failed"].saga_id]
        _, named = live.get("/api/sagas?name=checkout&state=completed")
        assert [s["saga_id"] for s in named["sagas"]] == [ran["completed"].saga_id]

        status, saga = live.get(f"/api/sagas/{ran['failed'].saga_id}")
        assert status == 200
        hotel = saga["steps"][0]
        assert (hotel["name"], hotel["status"], hotel["compensation_error"]["message"]) == (
            "book_hotel", "compensation_failed", "hotel provider is down")
        lines = [line["line"] for line in saga["trace"]]
        assert lines[0] == f"[SAGA-{ran['failed'].saga_id}] Starting saga: trip"
        assert any("Compensation failed: book_hotel" in line for line in lines)
        assert {"saga.trip.started", "saga.cmd.booking_service.reserve"} <= {e["type"] for e in saga["events"]}

        status, transaction = live.get(f"/api/transactions/{ran['paid'].correlation_id}")
        assert status == 200
        types = [e["type"] for e in transaction["events"]]
        assert types == ["order.created", "inventory.reserved", "payment.completed", "shipping.scheduled",
                         "order.completed"]
        lanes = [lane["name"] for lane in transaction["diagram"]["lanes"]]
        assert lanes == ["(publisher)", "inventory_service", "payment_service", "shipping_service", "order_service"]
        outcomes = [(a["event"], a["outcome"]) for a in transaction["diagram"]["arrows"]]
        assert outcomes[-1] == ("order.completed", "not_consumed")  # nobody handles the last event
        assert {outcome for _, outcome in outcomes[:-1]} == {"success"}

        status, letters = live.get("/api/dead-letters")
        assert status == 200
        [letter] = letters["dead_letters"]
        assert (letter["topic"], letter["handler"], letter["attempts"]) == (
            "audit.requested", "audit_service.record_audit", 1)
        assert HOSTILE in letter["reason"] and json.loads(letter["payload"]) == {"note": HOSTILE}

        status, flow = live.get("/api/flow")
        assert status == 200
        kinds = {(n["kind"], n["label"]) for n in flow["nodes"]}
        assert ("event", "order.created") in kinds and ("handler", "reserve_inventory") in kinds
        consumed = next(e for e in flow["edges"] if e["kind"] == "consumes"
                        and e["target"] == next(n["id"] for n in flow["nodes"] if n["label"] == "record_audit"))
        assert consumed["rate"] > 0
        audit = next(row for row in flow["streams"] if row["group"] == "audit_service.record_audit")
        assert (audit["lag"], audit["pending"]) == (0, 0)

        assert live.get("/api/health") == (200, {"ok": True, "broker": live.call(_url)})
        status, missing = live.get("/api/sagas/no-such-saga")
        assert (status, missing["error"]) == (404, "not found")
        assert live.get("/api/sagas?state=bogus")[0] == 400


async def _url(env: TestEnv) -> str:
    return env.broker.url


def test_pages_escape_hostile_strings_and_forbid_inline_script(broker_url: str) -> None:
    """HTML and script in event data and dead-letter reasons reach the page
    escaped, and the page's policy would not run inline script anyway."""
    with LiveSystem(broker_url, lab.build_apps()) as live:
        ran = live.call(run_lab)
        for path in ("/dead-letters", f"/sagas/{ran['compensated'].saga_id}",
                     f"/transactions/{ran['audit'].correlation_id}"):
            status, html = live.get(path)
            assert status == 200, path
            assert "<script>window.pwned" not in html and "onerror=\"window" not in html, path
            assert "&lt;script&gt;window.pwned=1&lt;/script&gt;" in html, path
        with urllib.request.urlopen(live.url + "/sagas", timeout=10) as response:
            policy = response.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "unsafe-inline" not in policy


def test_replay_and_purge_are_refused_without_allow_actions(broker_url: str) -> None:
    """Without --allow-actions a POST is refused (403) whatever it carries, and nothing changes."""
    with LiveSystem(broker_url, lab.build_apps()) as live:
        live.call(run_lab)
        [letter] = live.get("/api/dead-letters")[1]["dead_letters"]
        token = live.dashboard_token()
        body = json.dumps({"ids": [letter["id"]]}).encode()
        for path in ("/api/dead-letters/replay", "/api/dead-letters/purge"):
            status, answer = live.post(path, body, {"X-CSRF-Token": token, "Content-Type": "application/json"})
            assert (status, answer["error"]) == (403, "refused")
            assert "--allow-actions" in answer["message"]
        status, html = live.post("/dead-letters/replay", f"csrf_token={token}&id={letter['id']}".encode())
        assert status == 403 and "--allow-actions" in html
        _, page = live.get("/dead-letters")
        assert "Replay selected" not in page and "--allow-actions" in page
        assert len(live.get("/api/dead-letters")[1]["dead_letters"]) == 1


def test_replay_and_purge_need_the_csrf_token(broker_url: str) -> None:
    """With --allow-actions, a POST without the token or with a wrong one is
    refused; with it, the dead letter is replayed to its handler."""
    with LiveSystem(broker_url, lab.build_apps(), allow_actions=True) as live:
        live.call(run_lab)
        [letter] = live.get("/api/dead-letters")[1]["dead_letters"]
        body = json.dumps({"ids": [letter["id"]]}).encode()
        assert live.post("/api/dead-letters/replay", body)[0] == 403
        assert live.post("/api/dead-letters/purge", body, {"X-CSRF-Token": "guess"})[0] == 403
        assert live.post("/dead-letters/purge", f"id={letter['id']}".encode())[0] == 403
        assert live.post("/dead-letters/purge", f"csrf_token=guess&id={letter['id']}".encode())[0] == 403
        assert len(live.get("/api/dead-letters")[1]["dead_letters"]) == 1

        lab.FIXED["audit"] = True
        token = live.dashboard_token()
        status, done = live.post("/api/dead-letters/replay", body, {"X-CSRF-Token": token})
        assert (status, done) == (200, {"replayed": 1, "missing": []})
        live.call(lambda env: env.settle(timeout=10))
        assert live.get("/api/dead-letters")[1]["dead_letters"] == []
        assert [e.data["recorded"] for e in live.env.published("audit.recorded")] == [True]  # type: ignore[union-attr]


def test_thousands_of_sagas_and_dead_letters_are_paged(broker_url: str) -> None:
    """3000 sagas and 1200 dead letters: every one is on exactly one page, in order."""
    now = time.time()
    states = [SagaState.FAILED if n % 10 == 0 else SagaState.COMPLETED for n in range(3000)]
    records = [record(f"S-{n:05d}", now - 10_000 + n, state=state) for n, state in enumerate(states)]
    with LiveSystem(broker_url, []) as live:
        live.call(lambda env: write_records(env.broker, records))
        live.call(lambda env: dead_letters(env.broker, 1200))
        seen: list[str] = []
        after = ""
        while True:
            status, page = live.get(f"/api/sagas?limit=500&after={after}")
            assert status == 200
            seen += [s["saga_id"] for s in page["sagas"]]
            if page["next"] is None:
                break
            after = page["next"]
        assert seen == [f"S-{n:05d}" for n in reversed(range(3000))]
        _, failed = live.get("/api/sagas?state=failed&limit=500")
        assert len(failed["sagas"]) == 300 and failed["counts"]["failed"] == 300
        letters: list[str] = []
        offset: int | None = 0
        while offset is not None:
            _, page = live.get(f"/api/dead-letters?offset={offset}&limit=500")
            letters += [d["reason"] for d in page["dead_letters"]]
            offset = page["next_offset"]
        assert letters == [f"bulk failure m-{n}" for n in range(1200)]
        status, html = live.get("/sagas?limit=100")
        assert status == 200 and html.count('<tr class="') == 100 and 'id="next"' in html
        assert live.get("/api/sagas?limit=100000")[0] == 400


def test_saga_records_of_the_first_release_are_shown(broker_url: str) -> None:
    """A schema 1 record (no step names) is listed and shown, its steps named
    by the definition when the apps are given."""
    raw = {key: value for key, value in V1["records"].items()}
    with LiveSystem(broker_url, []) as live:
        live.call(lambda env: write_raw_records(env.broker, {f"S-{k}": v for k, v in raw.items()}))
        _, page = live.get("/api/sagas")
        assert len(page["sagas"]) == len(raw)
        for key in raw:
            status, saga = live.get(f"/api/sagas/S-{key}")
            assert status == 200 and saga["schema"] == 1
            assert saga["steps"][0]["name"] == "step1"
        status, html = live.get("/sagas/S-failed")
        assert status == 200 and "record schema 1" in html


def test_database_url_needs_postgres_state_and_is_never_shown_with_its_password() -> None:
    """--database without PostgreSQL state is a clear configuration error; a
    URL's password never reaches a page or a message."""
    assert redact("postgresql://app:s3cret@db:5432/x and redis://:pw@h:6379/0") == (
        "postgresql://app:***@db:5432/x and redis://:***@h:6379/0")
    try:
        import choreo.postgres  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigurationError, match="PostgreSQL state is not available") as caught:
            database_query("postgresql://app:s3cret@127.0.0.1/none")
        assert "s3cret" not in str(caught.value)
    app = create_app("memory://", database="postgresql://app:s3cret@127.0.0.1/none")
    assert app.state.dashboard.database == "postgresql://app:***@127.0.0.1/none"


def test_cli_serves_the_dashboard_for_the_given_apps(redis_server: RedisServer) -> None:
    """`choreo dashboard` binds 127.0.0.1, serves the flow of the apps named
    on the command line and stops on SIGINT; --database without PostgreSQL
    state exits 2."""
    redis_server.command("FLUSHALL")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    port = free_port()
    command = [sys.executable, "-m", "choreo", "dashboard", "tests.apps.dashboard_lab:build_apps",
               "--broker", redis_server.url, "--port", str(port)]
    with subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            assert f"http://127.0.0.1:{port}/sagas" in line
            status, flow = request(f"http://127.0.0.1:{port}/api/flow")
            assert status == 200 and any(n["label"] == "record_audit" for n in flow["nodes"])
            assert request(f"http://127.0.0.1:{port}/api/health")[1]["ok"] is True
            # A page on another site cannot reach it through a rebound DNS name.
            assert request(f"http://127.0.0.1:{port}/api/health", headers={"Host": "evil.example"})[0] == 400
        finally:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=20)
    assert process.returncode == 0
    if importlib.util.find_spec("choreo.postgres") is None:
        refused = subprocess.run([*command[:-2], "--port", "0", "--database", "postgresql://u:s3cret@127.0.0.1/x"],
                                 cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2 and "PostgreSQL state is not available" in refused.stderr
        assert "s3cret" not in refused.stderr + refused.stdout
