"""The context a handler can ask for with a ``ctx`` parameter."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import attrs

from brokers import Delivery, StateWrite
from choreo.errors import ConfigurationError

if TYPE_CHECKING:
    from brokers import Broker, Message
    from choreo.events import Event

__all__ = ("DATABASE", "ActionContext", "Context", "Held", "Scope", "StateValue")

#: The extension a runtime's database installs (``choreo.run(..., database=url)``):
#: an object whose ``transaction(ctx)`` opens a ``Held`` transaction for a handler.
DATABASE = "database"


class Held(Protocol):
    """A handler's database transaction, held open after its ``async with``
    block until the dispatcher commits it with the handler's events.

    Attributes:
        handled_before: This event's transaction committed in an earlier
            delivery (nothing is to be applied or published again).
    """

    handled_before: bool

    async def commit(self, messages: Sequence[Message]) -> None:
        """Add ``messages`` to the transaction (its outbox) and commit.

        Raises:
            TransactionConflict: lost to a concurrent transaction (run again).
            DatabaseUnavailable: the connection failed.
        """
        ...

    async def release(self) -> None:
        """Roll back unless committed; free the connection."""
        ...


@attrs.frozen
class StateValue:
    """A state value read through ``ctx.get_state``: its data and version."""

    data: dict[str, Any]
    version: int


@attrs.frozen
class Scope:
    """What every handler of one runtime shares: its broker, and the
    extensions its lifespan hooks installed (see ``choreo.lifecycle``)."""

    broker: Broker
    extensions: Mapping[str, Any]


class Context:
    """What a handler knows about the event it is handling.

    Attributes:
        event: The event being handled.
        service: The service (app) name.
        handler: The handler name.
        idempotency_key: Stable across every attempt of this handler on this
            event (for saga actions: saga id, step and action), for
            participants that must apply an effect once.
        logger: A logger whose records carry the event's ids.
        extensions: What the runtime's lifespan hooks installed for its
            handlers, by name (see ``choreo.lifecycle``).
    """

    __slots__ = (
        "_delivery", "_held", "_idempotency_key", "_logger", "_scope", "_writes", "event", "handler", "service",
    )

    def __init__(
        self, event: Event, service: str, handler: str, scope: Scope, delivery: Delivery | None = None
    ) -> None:
        self.event = event
        self._delivery = delivery
        self.service = service
        self.handler = handler
        self._idempotency_key: str | None = None  # made when asked for: most handlers never ask
        self._scope = scope
        self._writes: dict[str, StateWrite] = {}
        self._logger: logging.LoggerAdapter[logging.Logger] | None = None
        # A cell, not an attribute: an ActionContext shares it (as it shares staged writes).
        self._held: list[Held] = []

    @property
    def idempotency_key(self) -> str:
        if self._idempotency_key is None:
            event = self.event
            self._idempotency_key = event.headers.get("idempotency_key") or f"{self.service}.{self.handler}:{event.id}"
        return self._idempotency_key

    @property
    def event_id(self) -> str:
        return self.event.id

    @property
    def correlation_id(self) -> str:
        return self.event.correlation_id

    @property
    def causation_id(self) -> str | None:
        return self.event.causation_id

    @property
    def saga_id(self) -> str | None:
        return self.event.saga_id

    @property
    def attempt(self) -> int:
        return self.event.attempt

    @property
    def extensions(self) -> Mapping[str, Any]:
        return self._scope.extensions

    @property
    def logger(self) -> logging.LoggerAdapter[logging.Logger]:
        if self._logger is None:
            self._logger = logging.LoggerAdapter(
                logging.getLogger(f"choreo.handler.{self.service}"),
                {
                    "event_id": self.event.id,
                    "correlation_id": self.event.correlation_id,
                    "saga_id": self.event.saga_id,
                    "event_type": self.event.type,
                },
            )
        return self._logger

    async def get_state(self, key: str) -> StateValue | None:
        """Read a state key from the broker's versioned store (sees this handler's staged writes)."""
        staged = self._writes.get(key)
        if staged is not None:
            if staged.value is None:
                return None
            return StateValue(json.loads(staged.value), staged.expected_version + 1)
        stored = await self._scope.broker.get_state(key, near=self._delivery)
        if stored is None:
            return None
        return StateValue(json.loads(stored.value), stored.version)

    def set_state(self, key: str, data: dict[str, Any] | None, *, expected_version: int) -> None:
        """Stage a compare-and-set, committed atomically with the handler's
        emitted events and its ack. If another writer got there first, the
        commit is refused and the handler runs again on fresh state."""
        staged = self._writes.get(key)
        if staged is not None:
            expected_version = staged.expected_version  # one write per key and commit
        value = None if data is None else json.dumps(data, separators=(",", ":"), allow_nan=False).encode()
        self._writes[key] = StateWrite(key, value, expected_version)

    @property
    def state_writes(self) -> tuple[StateWrite, ...]:
        return tuple(self._writes.values())

    def transaction(self) -> contextlib.AbstractAsyncContextManager[Any]:
        """``async with ctx.transaction() as conn:``: a psycopg ``AsyncConnection``
        in a transaction of the runtime's database. The handler's writes on
        ``conn``, the events it returns and the record that this delivery was
        handled commit together, after the handler returns; the ack follows.

        Raises:
            ConfigurationError: the runtime has no database (``choreo.run(...,
                database=url)``, ``choreo worker --database``), or a second
                transaction in one handler run.
            AlreadyHandled: on entry, when an earlier delivery of this event
                committed (the body must not run again; let it propagate).
        """
        database = self._scope.extensions.get(DATABASE)
        if database is None:
            raise ConfigurationError(
                "ctx.transaction() needs a database: choreo.run(..., database=url), "
                "choreo worker --database URL, or CHOREO_DATABASE_URL"
            )
        if self._held:
            raise ConfigurationError(f"{self.service}.{self.handler} opened a second transaction for one event")
        return database.transaction(self)  # type: ignore[no-any-return]

    def hold(self, held: Held) -> None:
        """Keep the handler's transaction for the dispatcher to commit (``transaction`` calls it)."""
        self._held[:] = [held]

    @property
    def held(self) -> Held | None:
        """The handler's open transaction, if it asked for one."""
        return self._held[0] if self._held else None

    async def release(self) -> None:
        """Let go of the handler's transaction (rolled back unless committed)."""
        if self._held:
            await self._held.pop().release()

    def reset(self) -> None:
        """Forget staged writes (before the handler runs again after a conflict)."""
        self._writes.clear()
        self._held.clear()


class ActionContext(Context):
    """The context of a saga action: ``attempt`` is the step's attempt of
    this action (1, 2, ...), not the broker's delivery count of the command."""

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
