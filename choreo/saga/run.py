"""What one step of a saga transition works with: the events it publishes
(``Out``) and the view of the transition (``Run``) that the helpers of
``machine.py`` (late replies, parallel groups) act on.

``SagaRun`` in ``machine.py`` is the one implementation; the helpers take
this protocol so that they need not import the machine that calls them.
"""

from __future__ import annotations

from typing import Any, Protocol

import attrs

from choreo.saga.definition import SagaDefinition
from choreo.saga.record import Kind, SagaRecord

__all__ = ("Out", "Run")


@attrs.frozen
class Out:
    """An event a transition publishes: a command, a timer or a lifecycle event."""

    type: str
    data: dict[str, Any]
    delay: float | None = None
    headers: dict[str, str] | None = None


class Run(Protocol):
    """One transition of one saga's record, as its helpers see it.

    Attributes:
        definition: The saga's definition (the version the record runs on).
        record: The record, changed in place.
        now: The transition's time (Unix seconds).
        out: What the transition publishes, in order.
        ignored: Why the reply or timer was ignored, if it was (a metric label).
    """

    definition: SagaDefinition
    record: SagaRecord
    now: float
    out: list[Out]
    ignored: str | None

    @property
    def saga_id(self) -> str: ...

    def advance(self, index: int) -> None:
        """Step ``index`` is done: go on to what follows it."""

    def compensate(self, stage: tuple[int, ...]) -> None:
        """Begin backward recovery from before ``stage``."""

    def command(
        self, index: int, kind: Kind, attempt: int, delay: float | None, data: dict[str, Any] | None = None
    ) -> Out:
        """The command of step ``index`` running ``kind``."""

    def timer(self, index: int, after: float) -> Out:
        """The timeout of the command just sent for step ``index``."""

    def trace(self, line: str) -> None:
        """A ``[SAGA-id]`` trace line."""

    def detail(self, line: str) -> None:
        """A detail line (with ``trace_enabled``)."""
