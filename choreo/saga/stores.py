"""Where a coordinator keeps its sagas: the ``SagaStateStore`` seam.

A store reads a saga's record with a version and writes it back by
compare-and-set together with the events the transition causes, so that the
record and its commands change together or not at all. Two stores implement
it: ``BrokerStateStore`` (the default: records in the broker's state keys,
committed with the events and the delivery's ack in one broker commit) and
``choreo.postgres.PostgresStateStore`` (records in PostgreSQL tables, the
events in an outbox table of the same transaction, relayed to the broker).

Every store is also a ``SagaQuery``, so the operators' tools read sagas the
same way whichever store keeps them.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import attrs

from brokers import CommitStatus, StateWrite
from choreo.context import Context
from choreo.events import Event
from choreo.routing import Emit
from choreo.saga.definition import SagaState
from choreo.saga.query import BrokerSagaQuery, Cursor, SagaQuery
from choreo.saga.record import SagaRecord
from choreo.saga.run import Out
from choreo.saga.store import KEY_PREFIX, list_records

if TYPE_CHECKING:
    from choreo.lifecycle import Running

__all__ = ("BrokerStateStore", "SagaStateStore", "Stored", "all_records")


@attrs.frozen
class Stored:
    """A record as read, with the version its compare-and-set expects (0: absent)."""

    record: SagaRecord
    version: int


@runtime_checkable
class SagaStateStore(SagaQuery, Protocol):
    """Saga records, read with a version and written by compare-and-set
    together with the events a transition publishes.

    ``lifespan`` runs while a runtime runs the coordinator's app (a store
    connects and starts what it needs there). Methods taking ``runtime`` are
    called outside handlers (starting and resuming sagas, sweeping); those
    taking ``ctx`` inside the handler of a saga's reply or timer.
    """

    def lifespan(self, runtime: Running) -> contextlib.AbstractAsyncContextManager[object]:
        """Connect for ``runtime`` and start what the store runs beside it."""
        ...

    async def load(self, saga_id: str, runtime: Running) -> Stored | None:
        """The saga's record and version, or ``None``."""
        ...

    async def save(
        self,
        runtime: Running,
        saga_id: str,
        version: int,
        record: SagaRecord,
        events: Sequence[tuple[Event, float | None]],
    ) -> CommitStatus:
        """Write ``record`` if the stored version is still ``version`` (0: the
        saga must not exist yet), with ``events`` (and their delays), in one step.

        Returns:
            ``OK``, or ``CONFLICT`` when the compare-and-set lost (nothing written).
        """
        ...

    async def load_in(self, ctx: Context, saga_id: str) -> Stored | None:
        """The saga's record and version, read by the handler of ``ctx``."""
        ...

    async def save_in(
        self, ctx: Context, saga_id: str, version: int, record: SagaRecord | None, outs: Sequence[Out]
    ) -> list[Emit] | None:
        """Write ``record`` (``None``: delete it) and the events ``outs`` as the
        effect of the delivery ``ctx`` handles.

        Returns:
            What the handler returns for the dispatcher to commit with the
            ack, or ``None`` when the compare-and-set lost at once (read again).
        """
        ...

    async def overdue(self, now: float, grace: float, runtime: Running) -> list[SagaRecord]:
        """Running sagas whose step or deadline is overdue by more than ``grace`` seconds."""
        ...

    async def records(self, state: SagaState | None, runtime: Running) -> list[SagaRecord]:
        """Every stored record (in ``state`` if given), oldest first."""
        ...


async def all_records(query: SagaQuery, state: SagaState | None = None, page: int = 500) -> list[SagaRecord]:
    """Every record ``query`` holds (in ``state`` if given), oldest first."""
    records: list[SagaRecord] = []
    after: Cursor | None = None
    while True:
        batch = await query.page_records(state=state, after=after, limit=page)
        records.extend(batch)
        if len(batch) < page:
            break
        after = Cursor.after(batch[-1])
    records.reverse()
    return records


class BrokerStateStore:
    """Sagas in the broker's state keys (``<prefix><saga id>``): the record,
    the events and the delivery's ack are one broker commit.

    Args:
        prefix: Prefix of the keys.
    """

    def __init__(self, prefix: str = KEY_PREFIX) -> None:
        self.prefix = prefix
        self._runtime: Running | None = None

    def __repr__(self) -> str:
        return f"BrokerStateStore(prefix={self.prefix!r})"

    @contextlib.asynccontextmanager
    async def lifespan(self, runtime: Running) -> AsyncIterator[None]:
        previous, self._runtime = self._runtime, runtime
        try:
            yield
        finally:
            self._runtime = previous

    def key(self, saga_id: str) -> str:
        return f"{self.prefix}{saga_id}"

    async def load(self, saga_id: str, runtime: Running) -> Stored | None:
        stored = await runtime.broker.get_state(self.key(saga_id))
        return None if stored is None else Stored(SagaRecord.from_json(stored.value), stored.version)

    async def save(
        self,
        runtime: Running,
        saga_id: str,
        version: int,
        record: SagaRecord,
        events: Sequence[tuple[Event, float | None]],
    ) -> CommitStatus:
        return await runtime.commit(events, state=[StateWrite(self.key(saga_id), record.to_json(), version)])

    async def load_in(self, ctx: Context, saga_id: str) -> Stored | None:
        # Decoded once (by ctx.get_state) and encoded once (by ctx.set_state).
        stored = await ctx.get_state(self.key(saga_id))
        return None if stored is None else Stored(SagaRecord.from_dict(stored.data), stored.version)

    async def save_in(
        self, ctx: Context, saga_id: str, version: int, record: SagaRecord | None, outs: Sequence[Out]
    ) -> list[Emit] | None:
        # Staged: the dispatcher commits it with the events and the ack, and
        # runs the handler again if the compare-and-set loses.
        ctx.set_state(self.key(saga_id), None if record is None else record.to_dict(), expected_version=version)
        return [Emit(o.type, o.data, delay=o.delay, merge=False, headers=o.headers) for o in outs]

    async def overdue(self, now: float, grace: float, runtime: Running) -> list[SagaRecord]:
        return [
            record
            for record in await list_records(runtime.broker, self.prefix)
            if not record.state.terminal
            and (
                (record.deadline_at is not None and now > record.deadline_at + grace)
                or (record.due_at is not None and now > record.due_at + grace)
            )
        ]

    async def records(self, state: SagaState | None, runtime: Running) -> list[SagaRecord]:
        return await list_records(runtime.broker, self.prefix, state)

    def _query(self) -> BrokerSagaQuery:
        if self._runtime is None:
            raise RuntimeError("the broker state store is read while its app runs")
        return BrokerSagaQuery(self._runtime.broker, self.prefix)

    async def get_record(self, saga_id: str) -> SagaRecord | None:
        return await self._query().get_record(saga_id)

    async def page_records(
        self,
        *,
        state: SagaState | None = None,
        name: str | None = None,
        after: Cursor | None = None,
        limit: int = 50,
    ) -> list[SagaRecord]:
        return await self._query().page_records(state=state, name=name, after=after, limit=limit)

    async def count_records(self, *, name: str | None = None) -> dict[SagaState, int]:
        return await self._query().count_records(name=name)
