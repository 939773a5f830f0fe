"""Where a saga and its steps are: the states both the record and the topics use."""

from __future__ import annotations

import enum

__all__ = ("TERMINAL_STATES", "SagaState", "StepStatus")


class SagaState(enum.Enum):
    """Where a saga is in its life; ``TERMINAL_STATES`` are the ends."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    COMPENSATING = "compensating"
    COMPENSATED = "compensated"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        """Whether the saga has ended (nothing changes it but a resume)."""
        return self in TERMINAL_STATES


#: The states a saga ends in; each is also the phase of its last lifecycle event.
TERMINAL_STATES = (SagaState.COMPLETED, SagaState.COMPENSATED, SagaState.FAILED)


class StepStatus(enum.StrEnum):
    """The ``status`` of a step (a string: ``StepResult.status`` compares equal to its value)."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    COMPENSATING = "compensating"
    COMPENSATED = "compensated"
    SKIPPED = "skipped"
    COMPENSATION_FAILED = "compensation_failed"
