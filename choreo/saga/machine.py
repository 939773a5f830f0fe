"""The saga state machine: a stored record in, a new record and outputs out.

Pure: no broker, no clock of its own. The coordinator reads the record, calls
one transition, then writes the record back with compare-and-set in the same
commit as the outputs (commands, their timers, lifecycle events), so a
transition happens entirely or not at all.

Every command carries a ``token``; the record remembers the token of the one
command it waits for. A reply or timer with another token is stale (a late or
duplicate reply) and changes nothing, except that a success the saga does not
keep gets the step's compensation sent, once per reply (``choreo.saga.late``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from choreo.dispatcher import backoff_delay
from choreo.saga import late, parallel
from choreo.saga.definition import SagaDefinition, SagaState, StepStatus
from choreo.saga.record import Kind, Phase, SagaRecord
from choreo.saga.run import Out
from choreo.saga.topics import COMPENSATING, command_topic, lifecycle_topic, reply_topic, timeout_topic

__all__ = ("Out", "SagaRun")

log = logging.getLogger("choreo.saga")


class SagaRun:
    """One transition of one saga's record (changed in place).

    Args:
        definition: The saga's definition.
        record: The stored record, decoded for this transition (it is changed).
        now: Wall-clock time of this transition.
        trace: Receives the user-facing trace lines.
        detail: Receives per-event detail lines (``debug``/``trace_enabled``).

    Attributes:
        changed: Whether the transition changed the record (so it must be
            written back); a stale reply or timer changes nothing.
    """

    def __init__(
        self,
        definition: SagaDefinition,
        record: SagaRecord,
        now: float,
        trace: Callable[[str, str], None],
        detail: Callable[[str, str], None] | None = None,
    ) -> None:
        record.name_steps(definition)
        self.definition = definition
        self.record = record
        self.now = now
        self.out: list[Out] = []
        self.changed = False
        #: Why the reply or timer was ignored (``unknown_step``, ``stale``), if it was.
        self.ignored: str | None = None
        self._trace = trace
        self._detail = detail

    # -- entry points ------------------------------------------------------------

    @property
    def saga_id(self) -> str:
        return self.record.saga_id

    @property
    def state(self) -> SagaState:
        return self.record.state

    def start(self) -> list[Out]:
        self.trace(f"Starting saga: {self.definition.name}")
        self.record.state = SagaState.RUNNING
        self._lifecycle("started")
        if self.record.deadline_at is not None:
            delay = max(self.record.deadline_at - self.now, 0.0)
            self.out.append(Out(timeout_topic(self.definition.name), self._timer_data("deadline", -1), delay or None))
        self._enter(0)
        return self._finish()

    def on_reply(self, reply: dict[str, Any]) -> list[Out]:
        """Apply a participant's reply; stale and duplicate replies change nothing but a log line."""
        index = self.definition.index(str(reply.get("step")))
        kind = reply.get("kind")
        if index is None:
            log.warning("[SAGA-%s] ignoring a reply for unknown step %r", self.saga_id, reply.get("step"))
            self.ignored = "unknown_step"
            return []
        if kind == Kind.LATE:
            return self._finish() if late.on_late_compensated(self, index, reply) else []
        if not self.state.terminal and parallel.in_group(self, index):
            return self._finish() if parallel.on_reply(self, index, reply) else []
        if self.state.terminal or reply.get("token") != self.record.token or index != self.record.cursor:
            if reply.get("outcome") == "succeeded" and kind in (Kind.ACTION, Kind.FALLBACK):
                return self._finish() if late.on_late_success(self, index, reply) else []
            log.info("[SAGA-%s] ignoring a stale or duplicate reply from step %s", self.saga_id, reply.get("step"))
            self.ignored = "stale"
            return []
        self.detail(
            f"reply {reply.get('kind')} {reply.get('step')} attempt {reply.get('attempt')}: {reply.get('outcome')}"
        )
        result = reply.get("result")
        if isinstance(result, dict):
            self.record.data.update(result)
        if reply.get("outcome") == "succeeded":
            self._succeeded(index, reply)
        else:
            self._failed(index, reply.get("error") or {"type": "Error", "message": "failed"})
        return self._finish()

    def on_timer(self, timer: dict[str, Any]) -> list[Out]:
        """Apply a step timeout, a sweep or the saga deadline."""
        if self.state.terminal:
            return []
        if timer.get("kind") == "deadline":
            if self.record.phase is not Phase.FORWARD:
                return []
            index = self.record.cursor
            message = f"saga deadline of {self.definition.deadline}s exceeded"
            if parallel.in_group(self, index):
                parallel.on_deadline(self, {"type": "TimeoutError", "message": message})
                return self._finish()
            self.trace(
                f"Step {index + 1}/{len(self.definition.steps)}: {self.definition.steps[index].name} - TIMED OUT"
            )
            self._step_failed(index, {"type": "TimeoutError", "message": message})
            return self._finish()
        if parallel.in_group(self, self.record.cursor):
            branch = self.definition.index(str(timer.get("step"))) if timer.get("kind") == "step" else None
            return self._finish() if parallel.on_timer(self, branch, timer) else []
        if timer.get("token") != self.record.token:
            return []
        index = self.record.cursor
        step = self.definition.steps[index]
        what = step.compensation if self.record.kind is Kind.COMPENSATION else step.name
        self.trace(f"Step {index + 1}/{len(self.definition.steps)}: {what} - TIMED OUT")
        self._failed(index, {"type": "TimeoutError", "message": f"no reply within {step.timeout}s"})
        return self._finish()

    def resume(self) -> list[Out]:
        """Continue from the stored state: resend the awaited command, or retry
        the compensations that failed."""
        steps = self.record.steps
        if self.state is SagaState.FAILED:
            failed = [i for i in reversed(range(len(steps))) if steps[i].status is StepStatus.COMPENSATION_FAILED]
            if not failed:
                return []
            self.trace(f"Resuming saga: {self.definition.name} ({len(failed)} compensations to retry)")
            self.record.state = SagaState.COMPENSATING
            self.record.phase = Phase.BACKWARD
            self.record.queue = failed
            self._lifecycle(COMPENSATING)
            self._next_compensation()
            return self._finish()
        if self.state.terminal:
            return []
        self.trace(f"Resuming saga: {self.definition.name}")
        if parallel.in_group(self, self.record.cursor):
            parallel.resend(self)
            return self._finish()
        self._dispatch(self.record.cursor, self.record.kind or Kind.ACTION, max(self.record.attempt, 1), count=False)
        return self._finish()

    # -- transitions ---------------------------------------------------------------

    def _succeeded(self, index: int, reply: dict[str, Any]) -> None:
        step, state = self.definition.steps[index], self.record.steps[index]
        total = len(self.definition.steps)
        if self.record.kind is Kind.COMPENSATION:
            state.status = StepStatus.COMPENSATED
            state.comp_finished_at = self.now
            self._next_compensation()
            return
        state.finished_at = self.now
        state.status = StepStatus.SUCCEEDED
        state.error = None
        state.kept, state.kept_kind = self.record.token, self.record.kind
        late.drop_held(state, self.record.kind or Kind.ACTION)
        suffix = " (fallback)" if self.record.kind is Kind.FALLBACK else ""
        self.trace(f"Step {index + 1}/{total}: {step.name} - COMPLETED{suffix}")
        self.advance(index)

    def advance(self, index: int) -> None:
        """Step ``index`` (the last of its stage) is done: start the next stage, or complete."""
        if index + 1 < len(self.definition.steps):
            self._enter(index + 1)
        else:
            self._end(SagaState.COMPLETED, "Saga completed successfully")

    def _enter(self, index: int) -> None:
        stage = self.definition.stage(index)
        if len(stage) > 1:
            parallel.enter(self, stage)
        else:
            self._dispatch(index, Kind.ACTION, 1)

    def _failed(self, index: int, error: dict[str, Any]) -> None:
        step, state = self.definition.steps[index], self.record.steps[index]
        kind, attempt = self.record.kind or Kind.ACTION, self.record.attempt
        total = len(self.definition.steps)
        if kind is Kind.COMPENSATION:
            state.comp_error = error
        else:
            state.error = error
        if attempt < step.attempts:
            delay = backoff_delay(step.retry_delay, attempt) if step.retry_delay else None
            what = step.compensation if kind is Kind.COMPENSATION else step.name
            self.trace(f"Step {index + 1}/{total}: {what} - RETRYING (attempt {attempt + 1}/{step.attempts})")
            self._dispatch(index, kind, attempt + 1, delay=delay)
            return
        if kind is Kind.COMPENSATION:
            state.status = StepStatus.COMPENSATION_FAILED
            state.comp_finished_at = self.now
            log.error(
                "[SAGA-%s] Compensation failed: %s after %d attempts: %s; resume the saga once the cause is fixed",
                self.saga_id,
                step.compensation,
                attempt,
                error.get("message"),
            )
            self._next_compensation()
            return
        if kind is Kind.ACTION and step.fallback is not None:
            self.trace(f"Step {index + 1}/{total}: {step.name} - FALLBACK: {step.fallback}")
            self._dispatch(index, Kind.FALLBACK, 1)
            return
        self.trace(f"Step {index + 1}/{total}: {step.name} - FAILED")
        self._step_failed(index, error)

    def _step_failed(self, index: int, error: dict[str, Any]) -> None:
        state = self.record.steps[index]
        late.release_held(self, index)
        state.status = StepStatus.FAILED
        state.error = error
        state.finished_at = self.now
        self.record.error = {"step": self.definition.steps[index].name, **error}
        self.compensate((index,))

    def compensate(self, stage: tuple[int, ...]) -> None:
        """The stage failed: compensate its succeeded steps, then every earlier one, in reverse."""
        self.record.state = SagaState.COMPENSATING
        self.record.phase = Phase.BACKWARD
        steps = self.record.steps
        self.record.queue = [i for i in reversed(range(max(stage) + 1)) if steps[i].status is StepStatus.SUCCEEDED]
        self._lifecycle(COMPENSATING)
        self._next_compensation()

    def _next_compensation(self) -> None:
        queue = self.record.queue
        while queue:
            index = queue.pop(0)
            step, state = self.definition.steps[index], self.record.steps[index]
            if not step.compensatable or step.compensation is None:
                state.status = StepStatus.SKIPPED
                self.trace(f"Skipping compensation: {step.name} (not compensatable)")
                continue
            state.status = StepStatus.COMPENSATING
            self.trace(f"Compensating: {step.compensation}")
            self._dispatch(index, Kind.COMPENSATION, 1)
            return
        failed = [
            s.name
            for s, st in zip(self.definition.steps, self.record.steps, strict=True)
            if st.status is StepStatus.COMPENSATION_FAILED
        ]
        if failed:
            self._end(SagaState.FAILED, f"Saga failed: compensation failed for {', '.join(failed)}")
        else:
            self._end(SagaState.COMPENSATED, "Saga compensated successfully")

    def _end(self, state: SagaState, line: str) -> None:
        self.record.state = state
        self.record.phase = Phase.DONE
        self.record.due_at = None
        self.record.kind = None
        self.trace(line)
        self._lifecycle(state.value)

    # -- outputs -------------------------------------------------------------------

    def _dispatch(self, index: int, kind: Kind, attempt: int, delay: float | None = None, count: bool = True) -> None:
        step, state, record = self.definition.steps[index], self.record.steps[index], self.record
        record.token += 1
        record.cursor, record.kind, record.attempt = index, kind, attempt
        if state.held:
            late.release_held(self, index, keep_kind=kind)  # held successes of another command are not kept
        if kind is Kind.ACTION or kind is Kind.FALLBACK:
            state.status = StepStatus.RUNNING
            if count:
                state.attempts += 1
            if state.started_at is None:
                state.started_at = self.now
        elif kind is Kind.COMPENSATION:
            if count:
                state.comp_attempts += 1
            if state.comp_started_at is None:
                state.comp_started_at = self.now
            state.comp_finished_at = None
        self.out.append(self.command(index, kind, attempt, delay))
        record.due_at = None
        if step.timeout is not None:
            after = (delay or 0.0) + step.timeout
            record.due_at = self.now + after
            self.out.append(self.timer(index, after))

    def command(
        self, index: int, kind: Kind, attempt: int, delay: float | None, data: dict[str, Any] | None = None
    ) -> Out:
        """The command of step ``index`` running ``kind`` (with the saga's data, or ``data``)."""
        step = self.definition.steps[index]
        action = {
            Kind.ACTION: step.action,
            Kind.FALLBACK: step.fallback,
            Kind.COMPENSATION: step.compensation,
            Kind.LATE: step.compensation,
        }[kind]
        assert action is not None
        headers = {
            "idempotency_key": f"{self.saga_id}:{step.name}:{action}",
            "saga": self.definition.name,
            "saga_step": step.name,
            "saga_kind": kind.value,
            "saga_token": str(self.record.token if kind is not Kind.LATE else -1),
            "saga_attempt": str(attempt),
            "reply_to": reply_topic(self.definition.name),
        }
        self.detail(
            f"command {command_topic(step.service, action)} ({kind}, attempt {attempt}, token {headers['saga_token']})"
        )
        return Out(command_topic(step.service, action), dict(data or self.record.data), delay, headers)

    def timer(self, index: int, after: float) -> Out:
        """The timeout of the command just sent for step ``index``, ``after`` seconds from now."""
        return Out(timeout_topic(self.definition.name), self._timer_data("step", index), after)

    def _timer_data(self, kind: str, index: int) -> dict[str, Any]:
        step = self.definition.steps[index].name if index >= 0 else None
        return {"saga": self.definition.name, "kind": kind, "token": self.record.token, "step": step}

    def _lifecycle(self, what: str) -> None:
        record = self.record
        data: dict[str, Any] = {
            "saga": self.definition.name,
            "saga_id": self.saga_id,
            "state": record.state.value,
            "version": record.version,
            "correlation_id": record.correlation,
        }
        if what != "started":
            data.update(
                data=dict(record.data),
                error=record.error,
                steps=[step.to_dict() for step in record.steps],
                duration=max(self.now - record.created_at, 0.0),
            )
        self.out.append(Out(lifecycle_topic(self.definition.name, what), data))

    def _finish(self) -> list[Out]:
        self.record.updated_at = self.now
        self.changed = True
        return self.out

    def trace(self, line: str) -> None:
        self._trace(self.saga_id, line)

    def detail(self, line: str) -> None:
        if self._detail is not None:
            self._detail(self.saga_id, line)

