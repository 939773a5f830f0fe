"""The branches of a ``Parallel`` group: several commands awaited at once.

A plain step's command is the one the record waits for (``cursor``,
``token``, ``kind``); a group's branches each wait for their own, kept in
the branch's ``StepRecord.wait``. Only the forward run of a group is
concurrent: once the group fails, its succeeded branches are compensated one
at a time like any step (``SagaRun``'s compensation queue).

When a branch fails for good, the others start no new attempt: a failed
attempt ends them, a success is kept (then compensated with the rest), and
the group moves on once none is waiting. These functions are part of
``SagaRun``'s transition: pure, record in place.
"""

from __future__ import annotations

import logging
from typing import Any

from choreo.dispatcher import backoff_delay
from choreo.saga import late
from choreo.saga.record import Kind, Phase
from choreo.saga.run import Run
from choreo.saga.states import StepStatus

__all__ = ("enter", "in_group", "on_deadline", "on_reply", "on_timer", "resend")

log = logging.getLogger("choreo.saga")


def in_group(run: Run, index: int) -> bool:
    """Whether step ``index`` is a branch of a group the saga is running forward now."""
    stage = run.definition.stage(index)
    return len(stage) > 1 and run.record.phase is Phase.FORWARD and run.record.cursor in stage


def enter(run: Run, stage: tuple[int, ...]) -> None:
    """Command every branch of the group ``stage``."""
    record = run.record
    record.cursor, record.kind, record.attempt = stage[0], Kind.ACTION, 1
    run.trace(f"Running in parallel: {', '.join(run.definition.steps[i].name for i in stage)}")
    for index in stage:
        _send(run, index, Kind.ACTION, 1)
    _update_due(run, stage)


def on_reply(run: Run, index: int, reply: dict[str, Any]) -> bool:
    """Apply a reply to a branch; whether the record changed."""
    state = run.record.steps[index]
    wait, kind = state.wait, reply.get("kind")
    if wait is None or reply.get("token") != wait.get("token"):
        if reply.get("outcome") == "succeeded" and kind in (Kind.ACTION, Kind.FALLBACK):
            return late.on_late_success(run, index, reply)
        log.info("[SAGA-%s] ignoring a stale or duplicate reply from step %s", run.saga_id, reply.get("step"))
        run.ignored = "stale"
        return False
    run.detail(f"reply {kind} {reply.get('step')} attempt {reply.get('attempt')}: {reply.get('outcome')}")
    result = reply.get("result")
    if isinstance(result, dict):
        run.record.data.update(result)
    if reply.get("outcome") == "succeeded":
        _succeeded(run, index)
    else:
        _failed(run, index, reply.get("error") or {"type": "Error", "message": "failed"})
    return True


def on_timer(run: Run, index: int | None, timer: dict[str, Any]) -> bool:
    """A branch's timeout (``index``), or a sweep: every overdue branch failed an attempt."""
    stage = run.definition.stage(run.record.cursor)
    changed = False
    for i in stage if index is None else (index,):
        wait = run.record.steps[i].wait
        if wait is None:
            continue
        if index is not None and timer.get("token") != wait.get("token"):
            continue
        if index is None and (wait.get("due_at") is None or wait["due_at"] > run.now):
            continue
        step = run.definition.steps[i]
        run.trace(f"Step {i + 1}/{len(run.definition.steps)}: {step.name} - TIMED OUT")
        _failed(run, i, {"type": "TimeoutError", "message": f"no reply within {step.timeout}s"})
        changed = True
    return changed


def on_deadline(run: Run, error: dict[str, Any]) -> None:
    """The saga's deadline passed during the group: give up on every branch still running."""
    stage = run.definition.stage(run.record.cursor)
    for index in stage:
        state = run.record.steps[index]
        if state.wait is None:
            continue
        run.trace(f"Step {index + 1}/{len(run.definition.steps)}: {run.definition.steps[index].name} - TIMED OUT")
        _give_up(run, index, error)
    run.compensate(stage)


def resend(run: Run) -> None:
    """Resume: command again every branch still waiting (same attempt, a new token)."""
    stage = run.definition.stage(run.record.cursor)
    for index in stage:
        wait = run.record.steps[index].wait
        if wait is not None:
            _send(run, index, Kind(wait["kind"]), int(wait["attempt"]), count=False)
    _update_due(run, stage)


# -- branch transitions --------------------------------------------------------------


def _succeeded(run: Run, index: int) -> None:
    state, wait = run.record.steps[index], run.record.steps[index].wait
    assert wait is not None
    kind = Kind(wait["kind"])
    state.status, state.error, state.finished_at = StepStatus.SUCCEEDED, None, run.now
    state.kept, state.kept_kind, state.wait = wait["token"], kind, None
    late.drop_held(state, kind)
    suffix = " (fallback)" if kind is Kind.FALLBACK else ""
    run.trace(f"Step {index + 1}/{len(run.definition.steps)}: {run.definition.steps[index].name} - COMPLETED{suffix}")
    _settle(run, run.definition.stage(index))


def _failed(run: Run, index: int, error: dict[str, Any]) -> None:
    step, state, wait = run.definition.steps[index], run.record.steps[index], run.record.steps[index].wait
    assert wait is not None
    kind, attempt = Kind(wait["kind"]), int(wait["attempt"])
    stage = run.definition.stage(index)
    total = len(run.definition.steps)
    state.error = error
    # Once a branch failed for good the group is lost: start no new attempt.
    lost = any(run.record.steps[i].status is StepStatus.FAILED for i in stage)
    if not lost and attempt < step.attempts:
        delay = backoff_delay(step.retry_delay, attempt) if step.retry_delay else None
        run.trace(f"Step {index + 1}/{total}: {step.name} - RETRYING (attempt {attempt + 1}/{step.attempts})")
        _send(run, index, kind, attempt + 1, delay)
        _update_due(run, stage)
        return
    if not lost and kind is Kind.ACTION and step.fallback is not None:
        run.trace(f"Step {index + 1}/{total}: {step.name} - FALLBACK: {step.fallback}")
        _send(run, index, Kind.FALLBACK, 1)
        _update_due(run, stage)
        return
    run.trace(f"Step {index + 1}/{total}: {step.name} - FAILED")
    _give_up(run, index, error)
    _settle(run, stage)


def _give_up(run: Run, index: int, error: dict[str, Any]) -> None:
    state = run.record.steps[index]
    state.status, state.error, state.finished_at, state.wait = StepStatus.FAILED, error, run.now, None
    late.release_held(run, index)
    if run.record.error is None:
        run.record.error = {"step": run.definition.steps[index].name, **error}


def _settle(run: Run, stage: tuple[int, ...]) -> None:
    """Move on once no branch waits: compensate if one failed, else the next stage."""
    _update_due(run, stage)
    steps = run.record.steps
    if any(steps[i].wait is not None for i in stage):
        return
    if any(steps[i].status is StepStatus.FAILED for i in stage):
        run.compensate(stage)
    else:
        run.advance(stage[-1])


def _send(run: Run, index: int, kind: Kind, attempt: int, delay: float | None = None, count: bool = True) -> None:
    step, state, record = run.definition.steps[index], run.record.steps[index], run.record
    if state.held:
        late.release_held(run, index, keep_kind=kind)
    record.token += 1
    state.status = StepStatus.RUNNING
    if count:
        state.attempts += 1
    if state.started_at is None:
        state.started_at = run.now
    run.out.append(run.command(index, kind, attempt, delay))
    due = None
    if step.timeout is not None:
        after = (delay or 0.0) + step.timeout
        due = run.now + after
        run.out.append(run.timer(index, after))
    state.wait = {"token": record.token, "kind": kind.value, "attempt": attempt, "due_at": due}


def _update_due(run: Run, stage: tuple[int, ...]) -> None:
    """The record's ``due_at`` (what the sweeper looks at): the earliest branch timeout."""
    dues = [w["due_at"] for i in stage if (w := run.record.steps[i].wait) is not None and w.get("due_at") is not None]
    run.record.due_at = min(dues) if dues else None
