"""The saga orchestrator, built on the public routing and event API only.

``SagaCoordinator`` compiles step lists into handlers of an app's routing
table; ``@app.action`` registers the participants' actions;
``SagaTestHarness`` runs sagas on a virtual clock in tests.
"""

from __future__ import annotations

from choreo.saga.coordinator import SagaCoordinator
from choreo.saga.definition import (
    Parallel,
    SagaDefinition,
    SagaNotFound,
    SagaResult,
    SagaState,
    SagaStep,
    StepResult,
    StepStatus,
)

__all__ = (
    "Parallel",
    "SagaCoordinator",
    "SagaDefinition",
    "SagaNotFound",
    "SagaResult",
    "SagaState",
    "SagaStep",
    "StepResult",
    "StepStatus",
)
