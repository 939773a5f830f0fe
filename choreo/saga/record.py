"""The stored record of a saga (``SagaRecord``) and its public view.

A record is kept as JSON in the broker's state store under ``saga:<id>``;
``choreo.saga.machine`` changes it one transition at a time. ``schema`` is
the format version of the JSON: schema 1 (the first release: a ``v`` key and
steps without names) still loads, and is written back as the current schema
by the next transition.

The records are mutable on purpose. A transition decodes a fresh record,
changes a few fields in place and encodes it once. Measured on a three-step
saga (CPython 3.11), a typical reply (one step done, the next commanded)
changes the record in place in about 0.5 us; the same change made with
``attrs.evolve`` (a new record and new steps) takes about 8 us, more than
decoding the record (5 us). Nothing else holds a decoded record, so nothing
can see it change. Decoding and encoding a record this way takes about 7 us,
where the earlier copy and compare (two sorted JSON dumps and a load) took
about 24 us.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import attrs

from choreo.errors import DecodeError
from choreo.saga.definition import SagaDefinition, SagaResult, SagaState, StepResult, StepStatus

__all__ = ("SCHEMA", "Kind", "Phase", "SagaRecord", "StepRecord", "new_record", "result_of_lifecycle", "to_result")

#: The record format written by this release.
SCHEMA = 2
#: The definition version a record runs on, until definitions have versions.
DEFAULT_VERSION = 1


class Kind(enum.StrEnum):
    """What the command a saga waits for runs: a step's action or one of its recoveries."""

    ACTION = "action"
    FALLBACK = "fallback"
    COMPENSATION = "compensation"
    #: Undoing a step that succeeded after it was given up on.
    LATE = "late_compensation"


class Phase(enum.StrEnum):
    """Which way a saga moves through its steps."""

    FORWARD = "forward"
    BACKWARD = "backward"
    DONE = "done"


@attrs.define
class StepRecord:
    """One step of a stored saga.

    A success reply the saga does not keep (late, after its attempt timed
    out, or after the step's compensation began) is a *late success*: each
    one is undone by its own compensation command (see ``choreo.saga.late``).

    Attributes:
        late: Where undoing the late successes stands (``compensating``
            while any is outstanding, then ``compensated`` or
            ``compensation_failed``), or ``None`` if there were none.
        kept: The token of the command whose success the step kept.
        kept_kind: What that command ran (``action`` or ``fallback``).
        late_seen: Tokens of the late successes seen, so that a redelivered
            reply is undone once.
        held: Late successes of an attempt of the command still running
            (``token``, ``kind``, ``result``): the same effect as that
            command's (same idempotency key), so they are undone only if
            the command does not succeed.
        late_open: Compensation commands for late successes still unanswered.
        late_failed: How many of those commands replied with a failure.
        comp_attempts: Runs of the step's compensation so far.
        comp_error: The last failure of the compensation, or ``None``.
        comp_started_at: When the compensation was first commanded.
        comp_finished_at: When it succeeded or was given up on.
        wait: The command a branch of a running ``Parallel`` group waits
            for (``token``, ``kind``, ``attempt``, ``due_at``), or ``None``;
            a plain step's command is the record's ``token``/``kind``.
    """

    name: str
    status: StepStatus = StepStatus.PENDING
    attempts: int = 0
    error: dict[str, Any] | None = None
    started_at: float | None = None
    finished_at: float | None = None
    late: StepStatus | None = None
    kept: int | None = None
    kept_kind: str | None = None
    late_seen: list[int] = attrs.Factory(list)
    held: list[dict[str, Any]] = attrs.Factory(list)
    late_open: int = 0
    late_failed: int = 0
    comp_attempts: int = 0
    comp_error: dict[str, Any] | None = None
    comp_started_at: float | None = None
    comp_finished_at: float | None = None
    wait: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "name": self.name,
            "status": self.status.value,
            "attempts": self.attempts,
            "error": self.error,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "late": None if self.late is None else self.late.value,
        }
        # Written only when set: most steps never see a late reply.
        if self.kept is not None:
            data["kept"] = self.kept
            if self.kept_kind != "action":  # the usual kind is not written
                data["kept_kind"] = self.kept_kind
        if self.late_seen:
            data.update(late_seen=self.late_seen, late_open=self.late_open, late_failed=self.late_failed)
        if self.held:
            data["held"] = self.held
        if self.wait is not None:
            data["wait"] = self.wait
        if self.comp_attempts:
            data.update(
                comp_attempts=self.comp_attempts,
                comp_error=self.comp_error,
                comp_started_at=self.comp_started_at,
                comp_finished_at=self.comp_finished_at,
            )
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], name: str = "") -> StepRecord:
        """A step from its stored form; schema 1 stored no name, so ``name`` stands in."""
        late = data.get("late")
        kept = data.get("kept")
        step = cls(
            data.get("name") or name,
            StepStatus(data["status"]),
            data.get("attempts", 0),
            data.get("error"),
            data.get("started_at"),
            data.get("finished_at"),
            None if late is None else StepStatus(late),
            kept,
            None if kept is None else "action",
        )
        # The other fields are written only when set, which few steps are:
        # decoding them only then keeps the common reply cheap.
        if len(data) > _COMMON_FIELDS + (kept is not None):
            step.kept_kind = data.get("kept_kind", step.kept_kind)
            step.late_seen = list(data.get("late_seen", ()))
            step.held = list(data.get("held", ()))
            step.late_open = data.get("late_open", 0)
            step.late_failed = data.get("late_failed", 0)
            step.comp_attempts = data.get("comp_attempts", 0)
            step.comp_error = data.get("comp_error")
            step.comp_started_at = data.get("comp_started_at")
            step.comp_finished_at = data.get("comp_finished_at")
            step.wait = data.get("wait")
        return step


#: Fields every stored step has (schema 2): name, status, attempts, error, started_at, finished_at, late.
_COMMON_FIELDS = 7


@attrs.define
class SagaRecord:
    """A saga as stored: where it is, what it waits for, and each step.

    Attributes:
        version: The version of the saga's definition it runs on.
        phase: Forward through the steps, backward through compensations, or done.
        cursor: The step whose command the saga waits for.
        token: The token of that command; a reply with another one is stale.
        kind: What that command runs (``None`` once the saga ended).
        attempt: The attempt of that command (1, 2, ...).
        due_at: When that command times out (epoch seconds), or ``None``.
        deadline_at: When the whole saga times out, or ``None``.
        queue: Steps still to compensate, in order.
        schema: The record format (``SCHEMA`` once written by this release).
        correlation_id: The correlation id of every event of the saga
            (``None`` in records of the first release: the saga id).
    """

    saga_id: str
    name: str
    steps: list[StepRecord]
    data: dict[str, Any]
    created_at: float
    updated_at: float
    version: int = DEFAULT_VERSION
    state: SagaState = SagaState.PENDING
    error: dict[str, Any] | None = None
    phase: Phase = Phase.FORWARD
    cursor: int = 0
    token: int = 0
    kind: Kind | None = None
    attempt: int = 0
    due_at: float | None = None
    deadline_at: float | None = None
    queue: list[int] = attrs.Factory(list)
    schema: int = SCHEMA
    correlation_id: str | None = None

    @property
    def correlation(self) -> str:
        """The saga's correlation id (the saga id for records that stored none)."""
        return self.correlation_id or self.saga_id

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-ready values, in the current schema."""
        return {
            "schema": SCHEMA,
            "saga_id": self.saga_id,
            "name": self.name,
            "version": self.version,
            "state": self.state.value,
            "data": self.data,
            "error": self.error,
            "phase": self.phase.value,
            "cursor": self.cursor,
            "token": self.token,
            "kind": None if self.kind is None else self.kind.value,
            "attempt": self.attempt,
            "due_at": self.due_at,
            "deadline_at": self.deadline_at,
            "queue": self.queue,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "steps": [step.to_dict() for step in self.steps],
            # Written only when it is not the saga id (the usual case).
            **({} if self.correlation_id is None else {"correlation_id": self.correlation_id}),
        }

    def to_json(self) -> bytes:
        """The stored form: compact JSON in the current schema."""
        return json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False).encode()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SagaRecord:
        """A record from decoded JSON of any schema up to ``SCHEMA``.

        Raises:
            DecodeError: not a saga record, or one written by a newer release.
        """
        schema = data.get("schema", data.get("v"))
        if not isinstance(schema, int) or not 1 <= schema <= SCHEMA:
            raise DecodeError(f"saga record of schema {schema!r}: this release reads schemas 1 to {SCHEMA}")
        try:
            kind = data.get("kind")
            return cls(
                saga_id=data["saga_id"],
                name=data["name"],
                steps=[StepRecord.from_dict(step, f"step{i + 1}") for i, step in enumerate(data["steps"])],
                data=data["data"],
                created_at=data["created_at"],
                updated_at=data["updated_at"],
                version=data.get("version", DEFAULT_VERSION),
                state=SagaState(data["state"]),
                error=data.get("error"),
                phase=Phase(data["phase"]),
                cursor=data["cursor"],
                token=data["token"],
                kind=None if kind is None else Kind(kind),
                attempt=data["attempt"],
                due_at=data.get("due_at"),
                deadline_at=data.get("deadline_at"),
                queue=list(data.get("queue", ())),
                schema=schema,
                correlation_id=data.get("correlation_id"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DecodeError(f"invalid saga record: {type(exc).__name__}: {exc}") from None

    @classmethod
    def from_json(cls, raw: bytes | str) -> SagaRecord:
        """A record from its stored form (any schema up to ``SCHEMA``).

        Raises:
            DecodeError: not JSON, not a saga record, or one written by a newer release.
        """
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise DecodeError(f"saga record is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise DecodeError(f"saga record must be a JSON object, not {type(data).__name__}")
        return cls.from_dict(data)

    def name_steps(self, definition: SagaDefinition) -> None:
        """Give a schema 1 record (which stored no step names) its definition's names."""
        if self.schema == 1:
            for step, defined in zip(self.steps, definition.steps, strict=False):
                step.name = defined.name
            self.schema = SCHEMA


def new_record(
    definition: SagaDefinition,
    saga_id: str,
    data: dict[str, Any],
    now: float,
    correlation_id: str | None = None,
) -> SagaRecord:
    """The stored record of a saga about to start (its correlation id defaults to its id, stored as ``None``)."""
    return SagaRecord(
        saga_id=saga_id,
        name=definition.name,
        steps=[StepRecord(step.name) for step in definition.steps],
        data=dict(data),
        created_at=now,
        updated_at=now,
        version=definition.version,
        deadline_at=None if definition.deadline is None else now + definition.deadline,
        correlation_id=correlation_id if correlation_id != saga_id else None,
    )


def _time(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


def to_result(definition: SagaDefinition | None, record: SagaRecord) -> SagaResult:
    """The public view of a stored record.

    Step names are the record's own; a schema 1 record stored none, so they
    come from ``definition`` if given, else are ``step1``, ``step2``...
    """
    if record.schema == 1 and definition is not None:
        names = [step.name for step in definition.steps]
        steps = tuple(_step_result(s, name) for name, s in zip(names, record.steps, strict=False))
    else:
        steps = tuple(_step_result(s) for s in record.steps)
    return SagaResult(
        saga_id=record.saga_id,
        name=record.name,
        state=record.state,
        data=dict(record.data),
        error=record.error,
        steps=steps,
        version=record.version,
        correlation_id=record.correlation,
    )


def _step_result(step: StepRecord, name: str | None = None) -> StepResult:
    return StepResult(
        name or step.name,
        step.status,
        step.attempts,
        step.error,
        _time(step.started_at),
        _time(step.finished_at),
        step.comp_attempts,
        step.comp_error,
        _time(step.comp_started_at),
        _time(step.comp_finished_at),
    )


def result_of_lifecycle(saga_id: str, data: Mapping[str, Any]) -> SagaResult:
    """The public view carried by a saga's final lifecycle event (``saga.<name>.completed``...)."""
    steps: Sequence[Mapping[str, Any]] = data.get("steps") or ()
    return SagaResult(
        saga_id=saga_id,
        name=data["saga"],
        state=SagaState(data["state"]),
        data=dict(data.get("data") or {}),
        error=data.get("error"),
        steps=tuple(_step_result(StepRecord.from_dict(step, f"step{i + 1}")) for i, step in enumerate(steps)),
        version=data.get("version", DEFAULT_VERSION),
        correlation_id=data.get("correlation_id") or saga_id,
    )
