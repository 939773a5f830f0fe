"""Running one delivery through its handler and settling it with the broker.

For each delivery: decode, inject parameters, call the handler (sync handlers
in a worker thread) under its timeout, turn the result into emitted events, and
commit those, any staged state and the ack in one broker commit. Failures
become a retry (same event, ``attempt + 1``, delayed, to this group only), the
failure event once retries are spent, or a dead letter.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs

from brokers import Broker, CommitStatus, Delivery, Message, StateWrite
from brokers.base import new_message
from choreo import logs
from choreo.context import Context
from choreo.errors import DecodeError, EmitNotDeclared, PayloadValidationError, Reject, Retry
from choreo.events import DEFAULT_MAX_SIZE, Event, child_event, decode_event, encode_event
from choreo.failpoints import ACTIVE, hit
from choreo.middleware import Middleware, Outcome
from choreo.routing import Emit, Route, handler_arguments
from choreo.threads import run_in_daemon_thread

__all__ = ("Dispatcher", "backoff_delay", "error_info")

log = logging.getLogger("choreo.dispatcher")

#: Times a handler is re-run when its state writes lose a race, before the
#: delivery is left to be redelivered.
MAX_STATE_CONFLICTS = 20


def backoff_delay(retry_delay: float, attempt: int) -> float:
    """Delay before the retry that follows failed ``attempt`` (1-based):
    ``retry_delay * 2**(attempt-1)`` times a jitter factor in [0.75, 1.25]."""
    growth: float = 2.0 ** (attempt - 1)
    return retry_delay * growth * random.uniform(0.75, 1.25)


def error_info(exc: BaseException) -> dict[str, str]:
    """The ``error`` object of a failure event."""
    kind = type(exc)
    return {"type": f"{kind.__module__}.{kind.__qualname__}", "message": str(exc)}


class _Permanent(Exception):
    """A failure that retrying cannot fix: dead-letter at once."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Dispatcher:
    """Handles deliveries for a set of routes on one broker."""

    def __init__(
        self,
        routes: Sequence[Route],
        broker: Broker,
        *,
        middleware: Sequence[Middleware] = (),
        max_size: int = DEFAULT_MAX_SIZE,
    ) -> None:
        self.broker = broker
        self.routes = {route.group: route for route in routes}
        # Looked up once: inspecting the handler on every event shows in profiles.
        self._is_async = {route.group: inspect.iscoroutinefunction(route.handler) for route in routes}
        self.middleware = tuple(middleware)
        self.max_size = max_size

    def message(self, event: Event, *, delay: float | None = None, group: str | None = None) -> Message:
        return new_message(event.type, event.id, encode_event(event, max_size=self.max_size), delay, group)

    def published(self, events: Sequence[Event]) -> None:
        for hook in self.middleware:
            for event in events:
                try:
                    hook.on_publish(event)
                except Exception:  # an observer must never undo a commit
                    log.exception("middleware %r failed in on_publish", hook)

    async def handle(self, delivery: Delivery, done: Callable[[int], None] | None = None, key: int = 0) -> None:
        """Run and settle one delivery, then call ``done(key)`` if given (the
        runtime's bookkeeping, here rather than in a coroutine around this
        one: one frame less per delivery). Never raises except on cancellation."""
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
            ctx = Context(event, route.service, route.name, self.broker)
            token = logs.enter(event, delivery.group)  # log records carry the event's ids (group: the route's)
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
            finally:
                logs.leave(token)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("unexpected error on %s of %s; it will be redelivered", delivery.entry_id, delivery.topic)
        finally:
            if done is not None:
                done(key)

    async def _attempt(
        self, delivery: Delivery, route: Route, event: Event, ctx: Context, started: float
    ) -> CommitStatus | None:
        try:
            result = await self._call(route, event, ctx, self._is_async[delivery.group])
            if result is not None and type(result) is not dict and inspect.isawaitable(result):
                result = await result  # a sync function that returned a coroutine
            emitted = self._emitted(route, event, result)
            try:
                messages = [self.message(e, delay=delay) for e, delay in emitted] if emitted else []
            except DecodeError as exc:
                raise _Permanent(f"handler {route.group} emitted an event that cannot be encoded: {exc}") from None
        except _Permanent as exc:
            return await self._dead_letter(delivery, route, event, exc.reason, started, ctx)
        except Reject as exc:
            return await self._dead_letter(delivery, route, event, f"rejected: {exc.reason}", started, ctx)
        except Exception as exc:
            return await self._failed(delivery, route, event, exc, started, ctx)
        status = await self._commit(delivery, route, publish=messages, state=ctx.state_writes)
        if status is CommitStatus.OK and self.middleware:
            self.published([e for e, _ in emitted])
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
            message = self.message(retry, delay=delay, group=route.group)
            status = await self._commit(delivery, route, publish=[message], done=False)
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
        status = await self._commit(delivery, route, publish=[self.message(failed)])
        if status is CommitStatus.OK:
            self.published([failed])
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
        status = await self._commit(delivery, route, dead_letter=reason)
        if status is CommitStatus.OK:
            for hook in self.middleware:
                try:
                    hook.on_dead_letter(route, event, reason)
                except Exception:
                    log.exception("middleware %r failed in on_dead_letter", hook)
            self._handled(route, event, Outcome.DEAD_LETTERED, started)
        return status

    async def _commit(
        self,
        delivery: Delivery,
        route: Route,
        *,
        publish: Sequence[Message] = (),
        dead_letter: str | None = None,
        state: Sequence[StateWrite] = (),
        done: bool = True,
    ) -> CommitStatus | None:
        if ACTIVE:
            await hit("dispatcher.before_commit", route.group)
        try:
            status = await self.broker.commit(
                delivery, publish=publish, dead_letter=dead_letter, state=state, done=done
            )
        except Exception as exc:
            # Nothing is lost: the delivery stays pending and comes back after its lease.
            log.error("%s: commit of %s failed, it will be redelivered: %s", route.group, delivery.entry_id, exc)
            return None
        if ACTIVE:
            await hit("dispatcher.after_commit", route.group)
        if status is CommitStatus.LEASE_LOST:
            log.warning("%s: lease on %s was lost; another consumer owns it now", route.group, delivery.entry_id)
        elif status is CommitStatus.DUPLICATE:
            log.info("%s: %s duplicates message %s, settled meanwhile; dropped", route.group, delivery.entry_id,
                     delivery.message_id)
        return status

    def _handled(self, route: Route, event: Event | None, outcome: str, started: float) -> None:
        duration = time.perf_counter() - started
        for hook in self.middleware:
            try:
                hook.on_handled(route, event, outcome, duration)
            except Exception:
                log.exception("middleware %r failed in on_handled", hook)
