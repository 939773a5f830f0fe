"""The stored record of a saga: how a new one looks, and its public view.

The record is plain JSON (``v`` is its format version) kept in the broker's
state store under ``saga:<id>``; ``choreo.saga.machine`` changes it one
transition at a time.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from choreo.saga.definition import SagaDefinition, SagaResult, SagaState, StepResult, StepStatus

__all__ = ("BACKWARD", "FORWARD", "RECORD_VERSION", "new_record", "to_result")

FORWARD, BACKWARD = "forward", "backward"
RECORD_VERSION = 1


def new_record(definition: SagaDefinition, saga_id: str, data: dict[str, Any], now: float) -> dict[str, Any]:
    """The stored record of a saga about to start."""
    return {
        "v": RECORD_VERSION,
        "saga_id": saga_id,
        "name": definition.name,
        "state": SagaState.PENDING.value,
        "data": dict(data),
        "error": None,
        "phase": FORWARD,
        "cursor": 0,
        "token": 0,
        "kind": None,
        "attempt": 0,
        "due_at": None,
        "deadline_at": None if definition.deadline is None else now + definition.deadline,
        "queue": [],
        "created_at": now,
        "updated_at": now,
        "steps": [
            {
                "status": StepStatus.PENDING,
                "attempts": 0,
                "error": None,
                "started_at": None,
                "finished_at": None,
                "late": None,
            }
            for _ in definition.steps
        ],
    }


def _time(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


def to_result(definition: SagaDefinition | None, record: dict[str, Any]) -> SagaResult:
    """The public view of a stored record."""
    names = [s.name for s in definition.steps] if definition else [f"step{i + 1}" for i in range(len(record["steps"]))]
    steps = tuple(
        StepResult(name, s["status"], s["attempts"], s["error"], _time(s["started_at"]), _time(s["finished_at"]))
        for name, s in zip(names, record["steps"], strict=False)
    )
    return SagaResult(
        saga_id=record["saga_id"],
        name=record["name"],
        state=SagaState(record["state"]),
        data=dict(record["data"]),
        error=record["error"],
        steps=steps,
    )
