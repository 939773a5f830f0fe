"""The stored saga record: typed, versioned, readable without the app's code."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import pytest

from brokers import StateWrite
from choreo import admin
from choreo.errors import DecodeError
from choreo.saga import SagaDefinition, SagaResult, SagaState, SagaStep, StepStatus
from choreo.saga.machine import SagaRun
from choreo.saga.query import BrokerSagaQuery, Cursor
from choreo.saga.record import SCHEMA, Kind, Phase, SagaRecord, new_record, to_result
from choreo.saga.topics import (
    command_topic,
    is_lifecycle,
    lifecycle_topic,
    parse_lifecycle,
    parse_reply,
    reply_topic,
    timeout_topic,
)
from choreo.testing import run_apps
from tests.test_saga_brokers import build

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "saga_records_v1.json").read_text())
LABELS = sorted(FIXTURE["records"])


def definition(name: str) -> SagaDefinition:
    steps = [SagaStep(step, "svc", f"do_{step}", f"undo_{step}") for step in FIXTURE["definitions"][name]]
    return SagaDefinition.build(name, steps)


def view(result: SagaResult) -> dict[str, Any]:
    """The result as the fixture stores it: times in ISO format, enums by value."""

    def plain(instance: Any, attribute: Any, value: Any) -> Any:
        if hasattr(value, "isoformat"):
            return value.isoformat()
        return value.value if hasattr(value, "value") else value

    return json.loads(json.dumps(attrs.asdict(result, value_serializer=plain)))  # type: ignore[no-any-return]


@pytest.mark.parametrize("label", LABELS)
def test_records_written_by_the_first_release_load_with_the_same_public_view(label: str) -> None:
    """A schema 1 record loads and gives the SagaResult the first release gave, with and without its definition;
    the fields added since read version 1, the saga id as correlation id (what that release used) and no
    separate compensation details."""
    record = SagaRecord.from_json(FIXTURE["records"][label].encode())
    expected = FIXTURE["results"][label]
    assert record.schema == 1
    for result, seen in (
        (to_result(definition(record.name), record), expected["with_definition"]),
        (to_result(None, record), expected["without_definition"]),
    ):
        shown = view(result)
        assert (shown.pop("version"), shown.pop("correlation_id")) == (1, record.saga_id)
        for step in shown["steps"]:  # the first release stored no separate compensation details
            added = [step.pop(f"compensation_{field}") for field in ("attempts", "error", "started_at", "finished_at")]
            assert added == [0, None, None, None]
        assert shown == seen


def test_the_fixture_covers_running_completed_compensated_and_failed_sagas() -> None:
    """The stored examples include every end, a saga in flight, retries, a fallback and a failed compensation."""
    records = {label: SagaRecord.from_json(FIXTURE["records"][label]) for label in LABELS}
    assert {r.state for r in records.values()} == {
        SagaState.RUNNING, SagaState.COMPLETED, SagaState.COMPENSATED, SagaState.FAILED
    }
    failed = records["failed"]
    assert failed.steps[0].status is StepStatus.COMPENSATION_FAILED and failed.steps[0].attempts == 4
    assert records["running"].kind is Kind.ACTION and records["running"].phase is Phase.FORWARD


@pytest.mark.parametrize("label", LABELS)
def test_a_loaded_record_is_written_back_in_the_current_schema_with_step_names(label: str) -> None:
    """The next transition's write carries the schema, the step names and the definition version."""
    record = SagaRecord.from_json(FIXTURE["records"][label])
    SagaRun(definition(record.name), record, record.updated_at, lambda saga_id, line: None)
    stored = json.loads(record.to_json())
    assert stored["schema"] == SCHEMA and stored["version"] == 1
    assert [s["name"] for s in stored["steps"]] == FIXTURE["definitions"][record.name]
    again = SagaRecord.from_json(record.to_json())
    assert again == record
    assert to_result(None, again) == to_result(definition(record.name), SagaRecord.from_json(FIXTURE["records"][label]))


def test_a_new_record_round_trips_through_json() -> None:
    """to_json then from_json gives the same record, with its step names."""
    saga = definition("trip")
    record = new_record(saga, "S-1", {"total": 3}, 1_700_000_000.5)
    record.state, record.kind, record.queue = SagaState.COMPENSATING, Kind.COMPENSATION, [1, 0]
    record.steps[1].late = StepStatus.COMPENSATING
    loaded = SagaRecord.from_json(record.to_json())
    assert loaded == record
    assert [s.name for s in to_result(None, loaded).steps] == ["book", "pay", "ship"]


@pytest.mark.parametrize(
    "raw",
    [b"not json", b"[1]", b'{"schema": 99, "saga_id": "x"}', b'{"schema": 2, "saga_id": "x"}', b'{"saga_id": "x"}'],
)
def test_records_that_cannot_be_read_raise_decode_error(raw: bytes) -> None:
    """Garbage, a record of a newer release or a truncated record is a DecodeError, not a KeyError."""
    with pytest.raises(DecodeError):
        SagaRecord.from_json(raw)


def test_a_stale_reply_leaves_the_record_unchanged() -> None:
    """The machine says nothing changed, so the coordinator writes nothing."""
    record = SagaRecord.from_json(FIXTURE["records"]["running"])
    before = record.to_json()
    run = SagaRun(definition("waiting"), record, record.updated_at + 1, lambda saga_id, line: None)
    outs = run.on_reply({"step": "remote", "kind": "action", "token": record.token - 1, "outcome": "failed"})
    assert outs == [] and not run.changed
    assert json.loads(record.to_json())["updated_at"] == json.loads(before)["updated_at"]


def test_a_reply_that_moves_the_saga_reports_a_change() -> None:
    """A reply for the awaited command changes the record and says so."""
    record = SagaRecord.from_json(FIXTURE["records"]["running"])
    run = SagaRun(definition("waiting"), record, record.updated_at + 1, lambda saga_id, line: None)
    outs = run.on_reply({"step": "remote", "kind": "action", "token": record.token, "outcome": "succeeded"})
    assert run.changed and record.state is SagaState.COMPLETED
    assert [o.type for o in outs] == ["saga.waiting.completed"]
    assert outs[0].data["steps"][1]["name"] == "remote"


def test_topics_are_built_and_parsed_in_one_place() -> None:
    """Every saga topic family parses back to its parts; other topics are not taken for saga events."""
    assert command_topic("payment_service", "charge") == "saga.cmd.payment_service.charge"
    assert parse_reply(reply_topic("trip")) == "trip"
    assert parse_lifecycle(lifecycle_topic("trip", "compensated")) == ("trip", "compensated")
    assert timeout_topic("trip") == "saga.timeout.trip"
    for other in (
        "saga.cmd.payment_service.failed",
        "saga.timeout.failed",
        "saga.reply.completed",
        "order.completed",
        "saga.trip.paused",
    ):
        assert not is_lifecycle(other), other
    assert parse_reply("saga.reply.") is None and parse_reply("saga.cmd.x.y") is None


async def test_status_without_the_apps_shows_the_records_own_step_names(broker_url: str) -> None:
    """`choreo saga status ID` with no targets names the steps as the saga's definition does."""
    coordinator, apps = build({})
    async with run_apps(*apps, broker=broker_url) as env:
        await coordinator.start_saga("order_processing", {"total": 1}, saga_id="named", timeout=20)
        result = await admin.saga_status(env.broker, "named")
    assert [s.name for s in result.steps] == ["create_order", "process_payment", "ship"]


async def test_the_coordinator_and_the_admin_list_the_same_sagas(broker_url: str) -> None:
    """One listing: the same sagas, order and filter from the coordinator and from `choreo saga list`."""
    coordinator, apps = build({}, decline_over=10)
    async with run_apps(*apps, broker=broker_url) as env:
        await coordinator.start_saga("order_processing", {"total": 1}, saga_id="a-ok", timeout=20)
        await coordinator.start_saga("order_processing", {"total": 50}, saga_id="b-declined", timeout=20)
        # A record the first release wrote lists too (its steps named from the definition when known).
        old = json.loads(FIXTURE["records"]["running"])
        await env.runtime.commit([], state=[StateWrite("saga:S-running", json.dumps(old).encode(), 0)])
        mine = await coordinator.list_sagas()
        theirs = await admin.list_sagas(env.broker)
        compensated = await coordinator.list_sagas("compensated")
        shouted = await admin.list_sagas(env.broker, "COMPENSATED", apps=apps)
        with pytest.raises(ValueError, match="unknown saga state"):
            await admin.list_sagas(env.broker, "sleeping")
    assert [r.saga_id for r in mine] == [r.saga_id for r in theirs] == ["S-running", "a-ok", "b-declined"]
    assert mine[1:] == theirs[1:]
    assert [r.saga_id for r in compensated] == [r.saga_id for r in shouted] == ["b-declined"]


def test_a_record_with_every_optional_step_field_round_trips() -> None:
    """Fields written only when set (late replies, compensation details, a branch's wait) load back as written."""
    saga = definition("trip")
    record = new_record(saga, "S-2", {}, 1_700_000_000.0, correlation_id="req-1")
    step = record.steps[0]
    step.kept, step.kept_kind, step.late_seen, step.late_open, step.late_failed = 4, "fallback", [2, 3], 1, 1
    step.held = [{"token": 5, "kind": "action", "result": {"ref": "x"}}]
    step.comp_attempts, step.comp_error, step.comp_started_at, step.comp_finished_at = 2, {"message": "m"}, 1.0, 2.0
    step.wait = {"token": 6, "kind": "action", "attempt": 1, "due_at": None}
    record.steps[1].kept, record.steps[1].kept_kind = 7, "action"  # the usual kind: not written
    loaded = SagaRecord.from_json(record.to_json())
    assert loaded == record and b'"kept_kind":"action"' not in record.to_json()
    assert (loaded.correlation, loaded.steps[1].kept_kind, loaded.steps[2].kept_kind) == ("req-1", "action", None)
    plain = new_record(saga, "S-3", {}, 1_700_000_000.0)
    assert plain.correlation == "S-3" and b"correlation_id" not in plain.to_json()


async def test_saga_pages_run_newest_first_and_continue_where_they_ended(broker_url: str) -> None:
    """Operators page through sagas newest first, filtered by state and name, with counts per state."""
    coordinator, apps = build({}, decline_over=10)
    async with run_apps(*apps, broker=broker_url) as env:
        for n, total in enumerate([1, 50, 2, 60, 3]):
            await coordinator.start_saga("order_processing", {"total": total}, saga_id=f"s-{n}", timeout=20)
        query = BrokerSagaQuery(env.broker)
        first = await query.page_records(limit=2)
        second = await query.page_records(limit=2, after=Cursor.after(first[-1]))
        last = await query.page_records(limit=2, after=Cursor.after(second[-1]))
        compensated = await query.page_records(state=SagaState.COMPENSATED)
        other_name = await query.page_records(name="trip")
        counts = await query.count_records()
        one = await query.get_record("s-3")
        missing = await query.get_record("s-9")
    assert [r.saga_id for r in first + second + last] == ["s-4", "s-3", "s-2", "s-1", "s-0"]
    assert [r.saga_id for r in compensated] == ["s-3", "s-1"]
    assert other_name == []
    assert counts == {SagaState.COMPLETED: 3, SagaState.COMPENSATED: 2}
    assert one is not None and one.state is SagaState.COMPENSATED and missing is None
