"""Saga definitions and results: the values users write and read.

A saga is a named, ordered list of ``SagaStep``. Each step names the service
that runs it, the action to run, and the action that undoes it. Definitions
are validated when they are made, so a mistake is an error at import time
rather than in the middle of a transaction.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import attrs

from choreo.errors import ChoreoError, ConfigurationError
from choreo.saga.states import TERMINAL_STATES, SagaState, StepStatus
from choreo.saga.topics import RESERVED_SAGA_NAMES, command_topic, lifecycle_topic, reply_topic, timeout_topic

__all__ = (
    "Parallel",
    "SagaDefinition",
    "SagaNotFound",
    "SagaResult",
    "SagaState",
    "SagaStep",
    "StepResult",
    "StepStatus",
    "TERMINAL_STATES",
    "command_topic",
    "lifecycle_topic",
    "reply_topic",
    "timeout_topic",
)

#: Names of sagas, steps, services and actions: they become event type segments.
_NAME = re.compile(r"^[A-Za-z0-9_\-]{1,100}$")


class SagaNotFound(ChoreoError, LookupError):
    """No saga with this id is stored."""


def _check_name(what: str, value: object) -> None:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ConfigurationError(f"{what} {value!r} must be 1-100 letters, digits, '_' or '-'")


def _positive_or_none(what: str, value: float | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or value <= 0):
        raise ConfigurationError(f"{what} must be a positive number of seconds or None, not {value!r}")


@attrs.frozen(init=False)
class SagaStep:
    """One step of a saga: an action on a service, and what undoes it.

    Args:
        name: The step's name, unique in its saga.
        service: The service (``App`` name) whose ``@app.action`` runs it.
        action: The action to run.
        compensation: The action that undoes it, or ``None``.
        timeout: Seconds per attempt, from the moment the command is
            published; no reply by then is a failed attempt. ``None`` waits
            forever, on purpose (the default never hangs a saga).
        retry_count: Attempts after the first (for the action, the fallback
            and the compensation alike).
        retry_delay: Base of the backoff between attempts, seconds: the
            delay doubles after each failed attempt, with the handlers'
            jitter (x0.75 to x1.25); ``0`` retries at once.
        fallback: An action to run once the action's attempts are spent
            (forward recovery); if it succeeds the step counts as done.
        compensatable: ``False`` for steps that cannot be undone (an email
            sent); they are skipped during compensation.

    Raises:
        ConfigurationError: invalid names or values, a compensation or
            fallback equal to the action, or an unknown option.
    """

    name: str
    service: str
    action: str
    compensation: str | None
    timeout: float | None
    retry_count: int
    retry_delay: float
    fallback: str | None
    compensatable: bool

    def __init__(
        self,
        name: str,
        service: str,
        action: str,
        compensation: str | None = None,
        *,
        timeout: float | None = 30.0,
        retry_count: int = 3,
        retry_delay: float = 1.0,
        fallback: str | None = None,
        compensatable: bool = True,
        **unknown: Any,
    ) -> None:
        if unknown:
            raise ConfigurationError(f"saga step {name!r}: unknown options {', '.join(sorted(unknown))}")
        _check_name("step name", name)
        _check_name(f"step {name!r}: service", service)
        _check_name(f"step {name!r}: action", action)
        for what, other in (("compensation", compensation), ("fallback", fallback)):
            if other is not None:
                _check_name(f"step {name!r}: {what}", other)
                if other == action:
                    raise ConfigurationError(f"step {name!r}: the {what} {other!r} is the action itself")
        _positive_or_none(f"step {name!r}: timeout", timeout)
        if isinstance(retry_count, bool) or not isinstance(retry_count, int) or retry_count < 0:
            raise ConfigurationError(f"step {name!r}: retry_count must be an integer >= 0, not {retry_count!r}")
        if isinstance(retry_delay, bool) or not isinstance(retry_delay, int | float) or retry_delay < 0:
            raise ConfigurationError(f"step {name!r}: retry_delay must be >= 0, not {retry_delay!r}")
        self.__attrs_init__(
            name,
            service,
            action,
            compensation,
            timeout,
            retry_count,
            float(retry_delay),
            fallback,
            bool(compensatable),
        )

    @property
    def attempts(self) -> int:
        """Most runs of the action (and of the fallback, and of the compensation)."""
        return 1 + self.retry_count

    def actions(self) -> tuple[str, ...]:
        """Every action this step may command: action, fallback, compensation."""
        return tuple(a for a in (self.action, self.fallback, self.compensation) if a is not None)


@attrs.frozen(init=False)
class Parallel:
    """Steps that may run at once, standing as one entry in a saga's step list.

    The group succeeds when every branch succeeds. When a branch fails for
    good, the group waits for the branches still running (they start no new
    attempt), then every branch that succeeded and every earlier step is
    compensated: branches in any order, earlier steps in reverse.

    Example::

        coordinator.define_saga("checkout", [
            SagaStep("create_order", "orders", "create", "cancel"),
            Parallel(
                SagaStep("reserve_stock", "inventory", "reserve", "release"),
                SagaStep("authorise_payment", "payments", "authorise", "void"),
            ),
            SagaStep("ship", "shipping", "ship", None),
        ])

    Raises:
        ConfigurationError: fewer than two branches, or a branch that is not
            a ``SagaStep`` (groups do not nest).
    """

    steps: tuple[SagaStep, ...]

    def __init__(self, *steps: SagaStep) -> None:
        if len(steps) < 2:
            raise ConfigurationError(f"Parallel needs at least two steps, not {len(steps)}")
        for step in steps:
            if not isinstance(step, SagaStep):
                raise ConfigurationError(f"Parallel: {step!r} is not a SagaStep (groups do not nest)")
        self.__attrs_init__(tuple(steps))


@attrs.frozen
class SagaDefinition:
    """A named, validated list of steps, with saga-wide options.

    Attributes:
        steps: Every step, branches of a ``Parallel`` group in place (the
            order of ``SagaResult.steps``).
        deadline: Seconds from the start after which a saga still running is
            failed at its current step and compensated; ``None`` for none.
        stages: The indexes of ``steps`` that run together, stage by stage:
            one index for a plain step, several for a ``Parallel`` group.
        version: The version of this definition (several can run at once).
    """

    name: str
    steps: tuple[SagaStep, ...]
    deadline: float | None = None
    stages: tuple[tuple[int, ...], ...] = ()
    version: int = 1
    #: The stage of each step, by index (looked up on every reply).
    _stage_of: tuple[tuple[int, ...], ...] = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        stage_of = {index: stage for stage in self.stages for index in stage}
        object.__setattr__(self, "_stage_of", tuple(stage_of.get(i, (i,)) for i in range(len(self.steps))))

    @classmethod
    def build(cls, name: str, steps: Sequence[SagaStep | Parallel], **options: Any) -> SagaDefinition:
        """Validate and build a definition.

        Raises:
            ConfigurationError: a bad or reserved name, no steps, duplicate
                step names, something that is not a ``SagaStep`` or
                ``Parallel``, a bad version, or an unknown option.
        """
        deadline = options.pop("deadline", None)
        version = options.pop("version", 1)
        if options:
            raise ConfigurationError(f"saga {name!r}: unknown options {', '.join(sorted(options))}")
        _check_name("saga name", name)
        if name in RESERVED_SAGA_NAMES:
            raise ConfigurationError(f"saga name {name!r} is reserved (it would clash with saga.{name}.* events)")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ConfigurationError(f"saga {name!r}: version must be an integer >= 1, not {version!r}")
        flat: list[SagaStep] = []
        stages: list[tuple[int, ...]] = []
        for entry in steps:
            if isinstance(entry, Parallel):
                stages.append(tuple(range(len(flat), len(flat) + len(entry.steps))))
                flat.extend(entry.steps)
            elif isinstance(entry, SagaStep):
                stages.append((len(flat),))
                flat.append(entry)
            else:
                raise ConfigurationError(f"saga {name!r}: {entry!r} is not a SagaStep or Parallel")
        if not flat:
            raise ConfigurationError(f"saga {name!r} has no steps")
        names = [step.name for step in flat]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigurationError(f"saga {name!r}: duplicate step names {', '.join(duplicates)}")
        _positive_or_none(f"saga {name!r}: deadline", deadline)
        return cls(name, tuple(flat), deadline, tuple(stages), version)

    def stage(self, index: int) -> tuple[int, ...]:
        """The indexes of the steps that run together with step ``index`` (itself included)."""
        return self._stage_of[index]

    def index(self, step: str) -> int | None:
        for i, candidate in enumerate(self.steps):
            if candidate.name == step:
                return i
        return None

    def commands(self) -> tuple[str, ...]:
        """Every command topic this saga may publish, in step order."""
        topics = [command_topic(s.service, a) for s in self.steps for a in s.actions()]
        return tuple(dict.fromkeys(topics))


@attrs.frozen
class StepResult:
    """How one step went.

    Attributes:
        status: pending, running, succeeded, failed, compensating,
            compensated, skipped or compensation_failed.
        attempts: Runs of the action and fallback so far.
        error: ``{"type", "message"}`` of the last failure of the action or
            fallback, or ``None``.
        started_at: When the action was first commanded.
        finished_at: When the action (or fallback) succeeded or failed for good.
        compensation_attempts: Runs of the compensation so far (0: none).
        compensation_error: The last failure of the compensation, or ``None``
            (kept when a later attempt succeeded).
        compensation_started_at: When the compensation was first commanded.
        compensation_finished_at: When it succeeded or was given up on.
    """

    name: str
    status: str
    attempts: int = 0
    error: dict[str, Any] | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    compensation_attempts: int = 0
    compensation_error: dict[str, Any] | None = None
    compensation_started_at: datetime | None = None
    compensation_finished_at: datetime | None = None


@attrs.frozen
class SagaResult:
    """A saga as stored: its state, its data so far, and its steps.

    Attributes:
        data: The start data with every action's returned dict merged in.
        error: Why it failed or compensated (``step``, ``type``, ``message``),
            or ``None``.
        version: The version of the definition the saga runs on.
        correlation_id: The correlation id of every event of the saga: the
            one given to ``start_saga``, else that of the handler that
            started it, else the saga id.
    """

    saga_id: str
    name: str
    state: SagaState
    data: dict[str, Any]
    error: dict[str, Any] | None
    steps: tuple[StepResult, ...]
    version: int = 1
    correlation_id: str | None = None

    def step(self, name: str) -> StepResult:
        """The result of the step called ``name``.

        Raises:
            KeyError: no such step.
        """
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(name)

    @property
    def compensation_failures(self) -> list[str]:
        """Steps whose compensation failed: a person must look at these."""
        return [s.name for s in self.steps if s.status == StepStatus.COMPENSATION_FAILED]
