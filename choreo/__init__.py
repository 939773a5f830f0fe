"""choreo: sagas and choreography over events, on Redis Streams or in memory."""

from __future__ import annotations

from choreo.app import App
from choreo.context import Context, StateValue
from choreo.dead_letters import DeadLetter
from choreo.errors import (
    BrokerUnavailable,
    ChoreoError,
    ConfigurationError,
    DecodeError,
    EmitNotDeclared,
    PayloadValidationError,
    Reject,
    Retry,
)
from choreo.events import Event
from choreo.middleware import Middleware, Outcome
from choreo.options import RuntimeOptions
from choreo.routing import Emit, Route, Router, emits
from choreo.saga import Parallel, SagaCoordinator, SagaResult, SagaState, SagaStep, StepResult
from choreo.worker import Runtime, run

__all__ = (
    "App",
    "BrokerUnavailable",
    "ChoreoError",
    "ConfigurationError",
    "Context",
    "DeadLetter",
    "DecodeError",
    "Emit",
    "EmitNotDeclared",
    "Event",
    "Middleware",
    "Outcome",
    "Parallel",
    "PayloadValidationError",
    "Reject",
    "Retry",
    "Route",
    "Router",
    "Runtime",
    "RuntimeOptions",
    "SagaCoordinator",
    "SagaResult",
    "SagaState",
    "SagaStep",
    "StateValue",
    "StepResult",
    "emits",
    "run",
)
