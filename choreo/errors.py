"""choreo's error tree, and the control-flow signals handlers may raise.

One root, ``ChoreoError``; subtrees dual-inherit the builtin a caller would
catch anyway. ``Retry`` and ``Reject`` are signals, not errors: they steer
delivery and are not logged as failures; so is ``AlreadyHandled``, which a
handler's ``ctx.transaction()`` raises for a delivery it committed before.
"""

from __future__ import annotations

__all__ = (
    "AlreadyHandled",
    "BrokerUnavailable",
    "ChoreoError",
    "ConfigurationError",
    "DatabaseUnavailable",
    "DecodeError",
    "EmitNotDeclared",
    "PayloadValidationError",
    "Reject",
    "Retry",
    "TransactionConflict",
    "error_info",
)


class ChoreoError(Exception):
    """Root of every error choreo raises."""


class ConfigurationError(ChoreoError, ValueError):
    """An app, handler, saga or broker is set up wrongly (raised at registration)."""


class BrokerUnavailable(ChoreoError, ConnectionError):
    """The broker failed or cannot be reached."""


class DatabaseUnavailable(ChoreoError, ConnectionError):
    """The database failed or cannot be reached: a handler using it runs
    again after a pause, its delivery kept (nothing is committed twice: the
    inbox knows what committed)."""


class TransactionConflict(ChoreoError):
    """A database transaction lost to a concurrent one (a serialization
    failure or a deadlock): the handler runs again at once."""


class DecodeError(ChoreoError, ValueError):
    """A message or payload is not a valid choreo event (bad JSON, too big, too deep...)."""


class PayloadValidationError(DecodeError):
    """A payload does not fit the attrs class a handler asked for."""


class EmitNotDeclared(ChoreoError, LookupError):
    """A handler emitted an event its ``@emits`` does not declare.

    A programming error: the message is dead-lettered at once, nothing is published.
    """

    def __init__(self, event_type: str, handler: str, declared: tuple[str, ...]) -> None:
        self.event_type = event_type
        self.handler = handler
        self.declared = declared
        allowed = ", ".join(declared) if declared else "nothing (the handler is terminal)"
        super().__init__(f"handler {handler!r} emitted undeclared event {event_type!r}; it declares {allowed}")


class Retry(Exception):
    """Raise in a handler to retry the event later without counting it as a failure.

    Args:
        delay: Seconds to wait; ``None`` uses the handler's backoff.
    """

    def __init__(self, delay: float | None = None) -> None:
        super().__init__(delay)
        self.delay = delay


class Reject(Exception):
    """Raise in a handler to dead-letter the event at once with ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class AlreadyHandled(Exception):
    """Raised by ``ctx.transaction()`` when this event's transaction committed
    in an earlier delivery: the body must not run again. The delivery is
    acked with nothing applied (its events were committed then, and are
    published from the outbox)."""


def error_info(exc: BaseException) -> dict[str, str]:
    """The ``error`` object of a failure event or a failed action's reply."""
    kind = type(exc)
    return {"type": f"{kind.__module__}.{kind.__qualname__}", "message": str(exc)}
