"""Running one delivery through its handler and settling it with the broker.

For each delivery: decode, inject parameters, call the handler (sync handlers
in a worker thread) under its timeout, turn the result into emitted events, and
commit those, any staged state and the ack in one broker commit. Failures
become a retry (same event, ``attempt + 1``, delayed, to this group only), the
failure event once retries are spent, or a dead letter.

A handler that opened a database transaction (``ctx.transaction()``) is
settled in two steps: its events go into the transaction's outbox and the
transaction commits, then the delivery is acked (with nothing published: the
outbox relay publishes). A transaction that lost to a concurrent one runs
the handler again at once; a database that failed, after a pause.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import attrs

from brokers import CommitStatus, Delivery, Message
from choreo import logs
from choreo.context import Context, Scope
from choreo.errors import (
    DatabaseUnavailable,
    DecodeError,
    EmitNotDeclared,
    PayloadValidationError,
    Reject,
    Retry,
    TransactionConflict,
    error_info,
)
from choreo.events import Event, child_event, decode_event
from choreo.middleware import Outcome
from choreo.outbox import Outbox, Unencodable
from choreo.params import handler_arguments
from choreo.routing import Emit, Route
from choreo.threads import run_in_daemon_thread

__all__ = ("Dispatcher", "backoff_delay")

log = logging.getLogger("choreo.dispatcher")

#: Times a handler is re-run when its state writes lose a race, before the
#: delivery is left to be redelivered.
MAX_STATE_CONFLICTS = 20

#: Seconds (with jitter) before a handler runs again after its database
#: failed; the delivery keeps its lease meanwhile.
DATABASE_PAUSE = 1.0


def backoff_delay(retry_delay: float, attempt: int) -> float:
    """Delay before the retry that follows failed ``attempt`` (1-based):
    ``retry_delay * 2**(attempt-1)`` times a jitter factor in [0.75, 1.25]."""
    growth: float = 2.0 ** (attempt - 1)
    return retry_delay * growth * random.uniform(0.75, 1.25)


class _Permanent(Exception):
    """A failure that retrying cannot fix: dead-letter at once."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Dispatcher:
    """Handles deliveries for a set of routes, settling them through ``outbox``.

    Args:
        routes: The routes to run, by their group.
        outbox: Encodes and commits what handlers emit (its broker, size
            limit and middleware are the dispatcher's).
        extensions: What lifespan hooks installed, seen by handlers as
            ``ctx.extensions``.
        settled: Called with each delivery once ``handle`` is done with it
            (settled, failed or cancelled): the runtime frees its slot
            there, rather than in a coroutine around ``handle``, which would
            cost a frame per delivery.
    """

    def __init__(
        self,
        routes: Sequence[Route],
        outbox: Outbox,
        *,
        extensions: Mapping[str, Any] | None = None,
        settled: Callable[[Delivery], None] | None = None,
    ) -> None:
        self.outbox = outbox
        self.hooks = outbox.hooks
        self.max_size = outbox.max_size
        self.routes = {route.group: route for route in routes}
        self.scope = Scope(outbox.broker, {} if extensions is None else extensions)
        self._settled = settled
        # Looked up once: inspecting the handler on every event shows in profiles.
        self._is_async = {route.group: inspect.iscoroutinefunction(route.handler) for route in routes}

    async def handle(self, delivery: Delivery) -> None:
        """Run and settle one delivery. Never raises except on cancellation."""
        try:
            route = self.routes[delivery.group]
            started = time.perf_counter()
            try:
                event = decode_event(delivery.body, max_size=self.max_size)
                if event.type != route.event:
                    raise DecodeError(f"event type {event.type!r} arrived on topic {delivery.topic!r}")
            except DecodeError as exc:
                await self._dead_letter(delivery, route, None, f"undecodable message: {exc}", started)
                return
            if event.id != delivery.message_id:
                # Brokers dedupe on the entry's id: one that is not the event's
                # would let a copy of an event run twice, or hide another event.
                reason = f"id mismatch: the entry's id {delivery.message_id!r} is not the event's id {event.id!r}"
                await self._dead_letter(delivery, route, None, reason, started)
                return
            if delivery.duplicate:
                # The same event again (a producer's retried publish): already
                # settled here, so the commit only acks it (DUPLICATE, logged).
                await self.outbox.settle(delivery, delivery.group)
                return
            ctx = Context(event, route.service, route.name, self.scope, delivery)
            token = logs.enter(event, delivery.group)  # log records carry the event's ids (group: the route's)
            # Entered inline rather than by a coroutine around the attempts:
            # without middleware that wraps handling, this costs one test.
            hooks = self.hooks
            wrapping = None
            if hooks.handling:
                wrapping = hooks.enter(hooks.handling, self.outbox.broker, route, delivery, event)
            try:
                status = await self._attempt(delivery, route, event, ctx, started)
                runs = 1
                while status is CommitStatus.CONFLICT:
                    if runs == MAX_STATE_CONFLICTS:
                        log.warning("%s: state kept changing under event %s; leaving it for redelivery",
                                    route.group, event.id)
                        return
                    ctx.reset()
                    status = await self._attempt(delivery, route, event, ctx, started)
                    runs += 1
            except BaseException as exc:
                if wrapping is not None:
                    wrapping.exit(exc)  # exits once: not again in finally
                if ctx.held is not None:  # cancelled holding a transaction: roll it back
                    await asyncio.shield(ctx.release())
                raise
            finally:
                if wrapping is not None:
                    wrapping.exit()
                logs.leave(token)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("unexpected error on %s of %s; it will be redelivered", delivery.entry_id, delivery.topic)
        finally:
            if self._settled is not None:
                self._settled(delivery)

    async def _attempt(
        self, delivery: Delivery, route: Route, event: Event, ctx: Context, started: float
    ) -> CommitStatus | None:
        try:
            result = await self._call(route, event, ctx, self._is_async[delivery.group])
            if result is not None and type(result) is not dict and inspect.isawaitable(result):
                result = await result  # a sync function that returned a coroutine
            emitted = self._emitted(route, event, result)
            if emitted and self.hooks.headers:
                for child, _ in emitted:
                    self.hooks.stamp(child)
            try:
                message = self.outbox.message
                messages = []
                for child, delay in emitted:  # a loop: a comprehension is a call of its own on Python 3.11
                    messages.append(message(child, delay=delay))
            except DecodeError as exc:
                raise Unencodable(str(exc)) from None
        except Unencodable as exc:
            # Also raised by the handler itself: a saga's transition with PostgreSQL state encodes its
            # commands there (``Outbox.emitted``) for the database's outbox. Retrying cannot help.
            await ctx.release()
            reason = f"handler {route.group} emitted an event that cannot be encoded: {exc}"
            return await self._dead_letter(delivery, route, event, reason, started, ctx)
        except _Permanent as exc:
            await ctx.release()
            return await self._dead_letter(delivery, route, event, exc.reason, started, ctx)
        except Reject as exc:
            await ctx.release()
            if self.hooks.errors:
                self.hooks.call(self.hooks.errors, route, event, exc)
            return await self._dead_letter(delivery, route, event, f"rejected: {exc.reason}", started, ctx)
        except Exception as exc:
            if ctx.held is not None or isinstance(exc, TransactionConflict | DatabaseUnavailable):
                again = await self._transaction_failed(delivery, route, ctx, exc)
                if again is not None:
                    return again
            if self.hooks.errors:
                self.hooks.call(self.hooks.errors, route, event, exc)
            return await self._failed(delivery, route, event, exc, started, ctx)
        if ctx.held is not None:
            return await self._settle_held(delivery, route, event, ctx, messages, started)
        status = await self.outbox.settle(
            delivery, delivery.group, publish=messages, emitted=emitted, state=ctx.state_writes
        )
        if status is CommitStatus.OK and self.hooks.handled:
            self._handled(route, event, Outcome.SUCCESS, started)
        return status

    async def _transaction_failed(
        self, delivery: Delivery, route: Route, ctx: Context, exc: Exception
    ) -> CommitStatus | None:
        """A handler with a transaction raised: its transaction is rolled back.
        ``CONFLICT`` runs it again, a status settles it, ``None`` is a failure."""
        held = ctx.held
        await ctx.release()
        if held is not None and held.handled_before:
            # AlreadyHandled (or anything after it): committed by an earlier delivery.
            return await self.outbox.settle(delivery, route.group)
        if isinstance(exc, TransactionConflict):
            log.info("%s: %s; running it again", route.group, exc)
            return CommitStatus.CONFLICT
        if isinstance(exc, DatabaseUnavailable):
            log.warning("%s: database unavailable, running it again in ~%.0fs: %s", route.group, DATABASE_PAUSE, exc)
            await asyncio.sleep(DATABASE_PAUSE * random.uniform(0.75, 1.25))
            return CommitStatus.CONFLICT
        return None

    async def _settle_held(
        self, delivery: Delivery, route: Route, event: Event, ctx: Context, messages: list[Message], started: float
    ) -> CommitStatus | None:
        """Commit the handler's transaction with its events (the outbox), then ack."""
        held = ctx.held
        assert held is not None
        if not held.handled_before:
            if ctx.state_writes:
                await ctx.release()
                reason = f"handler {route.group} staged broker state in a database transaction; keep it in the database"
                return await self._dead_letter(delivery, route, event, reason, started, ctx)
            try:
                await held.commit(messages)
            except Exception as exc:
                again = await self._transaction_failed(delivery, route, ctx, exc)
                return again if again is not None else await self._failed(delivery, route, event, exc, started, ctx)
        await ctx.release()
        status = await self.outbox.settle(delivery, route.group)  # the ack: the events are in the outbox
        if status is CommitStatus.OK and self.hooks.handled:
            self._handled(route, event, Outcome.SUCCESS, started)
        return status

    def _call(self, route: Route, event: Event, ctx: Context, is_async: bool) -> Awaitable[Any]:
        """The handler's call, ready to await (a coroutine of its own only
        when a timeout has to be kept: one frame less per event otherwise)."""
        try:
            kwargs = handler_arguments(route.params, event, ctx, event.data)
        except PayloadValidationError as exc:
            raise _Permanent(f"invalid payload for {route.group}: {exc}") from None
        handler = route.handler
        call = handler(**kwargs) if is_async else run_in_daemon_thread(handler, **kwargs)
        if route.timeout is None:
            return call
        return self._timed(route, route.timeout, call)

    @staticmethod
    async def _timed(route: Route, timeout: float, call: Awaitable[Any]) -> Any:
        try:
            async with asyncio.timeout(timeout):
                return await call
        except TimeoutError:
            raise TimeoutError(f"handler {route.group} timed out after {timeout}s") from None

    def _emitted(self, route: Route, event: Event, result: Any) -> list[tuple[Event, float | None]]:
        """The events a handler's return value emits, with their delays."""
        if result is None or isinstance(result, dict):
            if route.terminal:
                return []
            # The common case, without building an Emit.
            data = {**event.data, **result} if result else dict(event.data)
            return [(child_event(event, route.emits[0], data), None)]
        if isinstance(result, Emit):
            choices = [result]
        elif isinstance(result, list | tuple) and all(isinstance(r, Emit) for r in result):
            # An empty list is an explicit choice to emit nothing.
            choices = list(result)
        else:
            raise _Permanent(
                f"handler {route.group} returned {type(result).__name__}; "
                "return a dict, None, an Emit or a list of Emit"
            )
        emitted = []
        for choice in choices:
            if choice.type not in route.emits:
                exc = EmitNotDeclared(choice.type, route.group, route.emits)
                raise _Permanent(f"{type(exc).__name__}: {exc}")
            if choice.data is not None and not isinstance(choice.data, dict):
                raise _Permanent(f"handler {route.group} emitted {choice.type!r} with non-object data")
            data = {**event.data, **(choice.data or {})} if choice.merge else dict(choice.data or {})
            emitted.append((child_event(event, choice.type, data, choice.headers), choice.delay))
        return emitted

    async def _failed(
        self, delivery: Delivery, route: Route, event: Event, exc: Exception, started: float, ctx: Context
    ) -> CommitStatus | None:
        attempts = 1 + route.retries
        if event.attempt < attempts:
            delay = exc.delay if isinstance(exc, Retry) and exc.delay is not None else None
            if delay is None:
                delay = backoff_delay(route.retry_delay, event.attempt)
            if not isinstance(exc, Retry):
                log.warning(
                    "%s failed on %s %s (attempt %d/%d), retrying in %.2fs: %s: %s",
                    route.group, event.type, event.id, event.attempt, attempts, delay, type(exc).__name__, exc,
                )
            retry = attrs.evolve(event, attempt=event.attempt + 1)
            message = self.outbox.message(retry, delay=delay, group=route.group)
            status = await self.outbox.settle(delivery, route.group, publish=[message], done=False)
            if status is CommitStatus.OK:
                self._handled(route, event, Outcome.RETRY, started)
            return status
        failure = route.failure_event
        if failure is None:
            reason = f"handler {route.group} failed after {event.attempt} attempts: {type(exc).__name__}: {exc}"
            log.error("%s", reason, exc_info=exc)
            return await self._dead_letter(delivery, route, event, reason, started, ctx)
        log.warning(
            "%s failed on %s %s after %d attempts, emitting %s: %s: %s",
            route.group, event.type, event.id, event.attempt, failure, type(exc).__name__, exc,
        )
        failed = child_event(event, failure, {**event.data, "error": error_info(exc)})
        self.hooks.stamp(failed)
        status = await self.outbox.settle(
            delivery, route.group, publish=[self.outbox.message(failed)], emitted=[(failed, None)]
        )
        if status is CommitStatus.OK:
            self._handled(route, event, Outcome.FAILED, started)
        return status

    async def _dead_letter(
        self,
        delivery: Delivery,
        route: Route,
        event: Event | None,
        reason: str,
        started: float,
        ctx: Context | None = None,
    ) -> CommitStatus | None:
        ids = f"event {event.id} (correlation {event.correlation_id})" if event else f"entry {delivery.entry_id}"
        log.error("dead-lettering %s on %s for %s: %s", ids, delivery.topic, route.group, reason)
        status = await self.outbox.settle(delivery, route.group, dead_letter=reason)
        if status is CommitStatus.OK:
            self.hooks.call(self.hooks.dead_lettered, route, event, reason)
            self._handled(route, event, Outcome.DEAD_LETTERED, started)
        return status

    def _handled(self, route: Route, event: Event | None, outcome: str, started: float) -> None:
        self.hooks.call(self.hooks.handled, route, event, outcome, time.perf_counter() - started)
