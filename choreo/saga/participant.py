"""Participants: the ``@app.action`` handlers that saga commands run.

An action is an ordinary route on ``saga.cmd.<service>.<action>`` with no
retries of its own (the step's policy, applied by the coordinator, is the only
one). Whatever the action does, the route answers with one reply event to the
saga that sent the command: success with the returned dict, or failure with
the error. A failing action is a failure reply, never a dead letter.
"""

from __future__ import annotations

import inspect
import logging
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from choreo.context import Context
from choreo.dispatcher import error_info
from choreo.errors import ConfigurationError, Reject
from choreo.events import Event
from choreo.routing import Emit, Handler, Route, handler_arguments, inspect_params
from choreo.saga.topics import REPLY_PREFIX, command_topic, is_reply
from choreo.threads import run_in_daemon_thread

if TYPE_CHECKING:
    from choreo.app import App
    from choreo.worker import Runtime

__all__ = ("REPLY_PREFIX", "Interceptor", "ReplyTopics", "register_action", "set_interceptor")

log = logging.getLogger("choreo.saga")

#: Called before an action runs with (service, action, data); may raise to
#: make the call fail. ``SagaTestHarness`` uses it to record calls and inject failures.
Interceptor = Callable[[str, str, dict[str, Any]], None]
_interceptors: weakref.WeakKeyDictionary[Runtime, Interceptor] = weakref.WeakKeyDictionary()


def set_interceptor(runtime: Runtime, interceptor: Interceptor | None) -> None:
    """Install (or remove) the interceptor for actions running in ``runtime``."""
    if interceptor is None:
        _interceptors.pop(runtime, None)
    else:
        _interceptors[runtime] = interceptor


class ReplyTopics(tuple[str, ...]):
    """The declared outputs of an action route: the reply topic of any saga.

    Which sagas command an action is known only to their coordinators, which
    may live in other processes, so membership is by family: every
    ``saga.reply.<name>`` is declared. Iterating shows the family's root.
    """

    def __new__(cls) -> ReplyTopics:
        return super().__new__(cls, (REPLY_PREFIX.rstrip("."),))

    def __contains__(self, item: object) -> bool:
        return isinstance(item, str) and is_reply(item)


def register_action(app: App, name: str, handler: Handler, *, service: str | None = None) -> Route:
    """Add the route that runs ``handler`` for ``saga.cmd.<service>.<name>``.

    Args:
        app: The participant service.
        name: The action name steps refer to.
        handler: The action: parameters injected like any handler's; returns a
            dict (merged into the saga's data) or ``None``.
        service: The service name in the command topic (default ``app.name``).

    Raises:
        ConfigurationError: a bad name, a parameter that cannot be injected,
            or the action registered twice.
    """
    if not callable(handler):
        raise ConfigurationError(f"@action({name!r}) must decorate a function")
    params = inspect_params(handler)
    service = service or app.name
    topic = command_topic(service, name)
    is_async = inspect.iscoroutinefunction(handler)
    wants_ctx = any(param.source == "ctx" for param in params)  # else no action context to build

    async def run_action(event: Event, ctx: Context) -> Emit:
        headers = event.headers
        reply_to = headers.get("reply_to", "")
        if reply_to not in ReplyTopics():
            raise Reject(f"saga command {event.id} has no valid reply_to header")
        started = time.perf_counter()
        reply: dict[str, Any] = {
            "saga": headers.get("saga"),
            "step": headers.get("saga_step"),
            "kind": headers.get("saga_kind"),
            "token": _int(headers.get("saga_token")),
            "attempt": _int(headers.get("saga_attempt")),
            "action": name,
        }
        try:
            interceptor = _interceptors.get(app.runtime) if _interceptors else None
            if interceptor is not None:
                interceptor(service, name, dict(event.data))
            action_ctx = ActionContext.of(ctx, reply["attempt"]) if wants_ctx else ctx
            kwargs = handler_arguments(params, event, action_ctx, event.data)
            if is_async:
                result = await handler(**kwargs)
            else:
                result = await run_in_daemon_thread(handler, **kwargs)
            if inspect.isawaitable(result):
                result = await result
            if result is None:
                result = {}
            if not isinstance(result, dict):
                raise TypeError(f"action {name!r} returned {type(result).__name__}; return a dict or None")
            reply.update(outcome="succeeded", result=result, error=None)
        except Exception as exc:  # any failure is a failure reply, never a dead letter
            log.warning(
                "[SAGA-%s] action %s.%s failed (attempt %s): %s: %s",
                event.saga_id,
                service,
                name,
                reply["attempt"],
                type(exc).__name__,
                exc,
            )
            reply.update(outcome="failed", result={}, error=error_info(exc))
        reply["duration"] = time.perf_counter() - started
        return Emit(reply_to, reply, merge=False)

    run_action.__qualname__ = run_action.__name__ = f"action_{name}"
    route = Route(
        event=topic,
        service=app.name,
        name=f"action_{name}",
        handler=run_action,
        emits=ReplyTopics(),
        retries=0,
        retry_delay=0.0,
    )
    return app.router.add(route)


class ActionContext(Context):
    """The context of an action: ``attempt`` is the step's attempt of this
    action (1, 2, ...), not the broker's delivery count of this command."""

    __slots__ = ("_attempt",)
    _attempt: int

    @classmethod
    def of(cls, ctx: Context, attempt: int | None) -> Context:
        """``ctx`` with the step's ``attempt``; staged state writes stay ``ctx``'s."""
        if attempt is None:
            return ctx
        action = cls.__new__(cls)
        for name in Context.__slots__:
            setattr(action, name, getattr(ctx, name))  # the same staged-writes dict, not a copy
        action._attempt = attempt
        return action

    @property
    def attempt(self) -> int:
        return self._attempt


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
