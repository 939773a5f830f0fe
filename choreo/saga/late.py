"""Late successes: success replies a saga does not keep, each undone once.

A reply is *late* when it does not answer the command the saga waits for: its
attempt timed out and the step moved on (a retry, the fallback, compensation),
or the saga already began compensating. Its effect happened all the same, so
the coordinator sends the step's compensation for it, once per such reply
(a redelivered reply is recognised by its command's token). With participants
that apply an effect once per idempotency key and whose compensation undoes
whatever that key holds (docs/idempotency.md), no effect survives a
COMPENSATED saga.

Two exceptions keep the saga's kept effects intact. A late success of an
earlier attempt of the command still running has the same idempotency key as
that command, so it is the same effect: it is *held*, dropped if the command
succeeds (the step keeps that effect) and undone if the command does not. A
late success of the kind the step kept (action or fallback) while the step
stands succeeded is that same effect again, and changes nothing.

These functions are part of ``SagaRun``'s transition: pure, record in place.
"""

from __future__ import annotations

import logging
from typing import Any

from choreo.saga.record import Kind, Phase, StepRecord
from choreo.saga.run import Run
from choreo.saga.states import StepStatus

__all__ = ("drop_held", "on_late_compensated", "on_late_success", "release_held")

log = logging.getLogger("choreo.saga")


def on_late_success(run: Run, index: int, reply: dict[str, Any]) -> bool:
    """Apply a success reply the saga does not keep; whether the record changed."""
    step, state, record = run.definition.steps[index], run.record.steps[index], run.record
    token, kind = reply.get("token"), reply.get("kind")
    if not isinstance(token, int) or token < 0 or token == state.kept or token in state.late_seen:
        log.info("[SAGA-%s] ignoring a stale or duplicate reply from step %s", run.saga_id, step.name)
        run.ignored = "stale"
        return False
    if state.status is StepStatus.SUCCEEDED and kind == state.kept_kind:
        # Same idempotency key as the success the step kept: the same effect.
        log.info("[SAGA-%s] ignoring a repeated success of step %s (its effect is kept)", run.saga_id, step.name)
        return False
    state.late_seen.append(token)
    result = reply.get("result")
    result = result if isinstance(result, dict) else {}
    # A branch of a running Parallel group keeps its own awaited command.
    plain = record.kind if record.cursor == index else None
    awaited = state.wait.get("kind") if state.wait is not None else plain
    running = (
        not record.state.terminal
        and record.phase is Phase.FORWARD
        and awaited == kind
        and state.status is StepStatus.RUNNING
    )
    if running:
        log.info(
            "[SAGA-%s] step %s: attempt %s succeeded after it timed out; held until the current attempt ends",
            run.saga_id,
            step.name,
            reply.get("attempt"),
        )
        state.held.append({"token": token, "kind": kind, "result": result})
        return True
    _undo(run, index, result)
    return True


def release_held(run: Run, index: int, keep_kind: Kind | None = None) -> None:
    """Undo the held late successes of step ``index``, except those of ``keep_kind``."""
    state = run.record.steps[index]
    held, state.held = state.held, [h for h in state.held if h.get("kind") == keep_kind]
    for entry in held:
        if entry.get("kind") != keep_kind:
            _undo(run, index, entry.get("result") or {})


def drop_held(state: StepRecord, kind: Kind) -> None:
    """The command of ``kind`` succeeded and is kept: its held late successes were the same effect."""
    if state.held:
        state.held = [h for h in state.held if h.get("kind") != kind]


def on_late_compensated(run: Run, index: int, reply: dict[str, Any]) -> bool:
    """Apply the reply to a late success's compensation; whether the record changed."""
    state = run.record.steps[index]
    if state.late is None:
        return False
    succeeded = reply.get("outcome") == "succeeded"
    state.late_open = max(state.late_open - 1, 0)
    if not succeeded:
        state.late_failed += 1
        log.error(
            "[SAGA-%s] compensation of the late step %s failed: %s; the effect may linger, a person must look",
            run.saga_id,
            run.definition.steps[index].name,
            (reply.get("error") or {}).get("message"),
        )
    if state.late_open == 0:
        state.late = StepStatus.COMPENSATION_FAILED if state.late_failed else StepStatus.COMPENSATED
    return True


def _undo(run: Run, index: int, result: dict[str, Any]) -> None:
    step, state = run.definition.steps[index], run.record.steps[index]
    if step.compensation is None or not step.compensatable:
        log.warning("[SAGA-%s] step %s completed after it was given up on; nothing undoes it", run.saga_id, step.name)
        return
    log.warning("[SAGA-%s] step %s completed after it was given up on; compensating it", run.saga_id, step.name)
    state.late = StepStatus.COMPENSATING
    state.late_open += 1
    run.out.append(run.command(index, Kind.LATE, 1, None, data={**run.record.data, **result}))
