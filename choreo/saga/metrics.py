"""The saga metrics, observed by a middleware of the saga package.

Names (public contract, see docs/metrics.md):

* ``choreo_saga_{started,compensating,completed,compensated,failed}_total{saga}``:
  the lifecycle events this process publishes (the coordinator's process).
* ``choreo_saga_version_missing_total{saga,version}``: replies, timers and
  resumes for a saga version this process no longer defines.
* ``choreo_saga_step_duration_seconds{saga,step}``: the duration of one
  attempt of an action or compensation, as the participant measured it and
  carried it on its reply (the participant's process).

The metrics live in the registry of a core ``Metrics``, which hands them out;
``SagaMetrics.missing`` finds the ``Metrics`` of a runtime that have no saga
observer yet.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from choreo.metrics import Metrics
from choreo.middleware import Middleware
from choreo.saga.topics import LIFECYCLE_PHASES, parse_lifecycle, parse_reply

if TYPE_CHECKING:
    from choreo.events import Event

__all__ = ("STEP_BUCKETS", "SagaMetrics")

#: Saga steps include retries and backoff, so they run longer than handlers.
STEP_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class SagaMetrics(Middleware):
    """Counts sagas by lifecycle event and times steps from their replies.

    Args:
        metrics: The core metrics whose registry holds the saga metrics.

    Example::

        metrics = Metrics()
        async with choreo.run(app, middleware=[metrics, SagaMetrics(metrics)]):
            ...
    """

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.sagas = {
            phase: metrics.counter(f"choreo_saga_{phase}_total", f"Sagas {phase}.", ["saga"])
            for phase in LIFECYCLE_PHASES
        }
        self.step_duration = metrics.histogram(
            "choreo_saga_step_duration_seconds",
            "Seconds one attempt of a saga step's action or compensation took, as measured by the participant.",
            ["saga", "step"],
            STEP_BUCKETS,
        )
        self.version_missing = metrics.counter(
            "choreo_saga_version_missing_total",
            "Replies, timers and resumes for a saga version no longer defined (the saga was left as it is).",
            ["saga", "version"],
        )
        self.replies_ignored = metrics.counter(
            "choreo_saga_replies_ignored_total",
            "Replies and timers a saga ignored: reason unknown_saga, unknown_step or stale (an old or forged token).",
            ["saga", "reason"],
        )

    @staticmethod
    def count_version_missing(middleware: Sequence[Middleware], saga: str, version: int) -> None:
        """Count, in every ``SagaMetrics`` of ``middleware``, an event for a version not defined."""
        for observer in middleware:
            if isinstance(observer, SagaMetrics):
                observer.version_missing.labels(saga, str(version)).inc()

    @staticmethod
    def count_ignored(middleware: Sequence[Middleware], saga: str, reason: str) -> None:
        """Count, in every ``SagaMetrics`` of ``middleware``, a reply or timer the saga ignored."""
        for observer in middleware:
            if isinstance(observer, SagaMetrics):
                observer.replies_ignored.labels(saga, reason).inc()

    @classmethod
    def missing(cls, middleware: Sequence[Middleware]) -> list[SagaMetrics]:
        """A ``SagaMetrics`` for each ``Metrics`` in ``middleware`` that has none there yet."""
        observed = {id(m.metrics) for m in middleware if isinstance(m, SagaMetrics)}
        return [cls(m) for m in middleware if isinstance(m, Metrics) and id(m) not in observed]

    def on_publish(self, event: Event) -> None:
        lifecycle = parse_lifecycle(event.type)
        if lifecycle is not None:
            saga, phase = lifecycle
            named = event.data.get("saga")
            self.sagas[phase].labels(named if isinstance(named, str) and named else saga).inc()
            return
        replied = parse_reply(event.type)
        if replied is not None:
            self._observe_step(replied, event.data)

    def _observe_step(self, saga: str, data: dict[str, Any]) -> None:
        # A reply that closes a step may carry how long the step took.
        step, duration = data.get("step"), data.get("duration")
        valid = isinstance(duration, int | float) and not isinstance(duration, bool) and duration >= 0
        if isinstance(step, str) and valid:
            self.step_duration.labels(saga, step).observe(float(duration))  # type: ignore[arg-type]
