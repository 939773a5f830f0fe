"""Reading stored sagas a page at a time: the one question operators' tools ask.

``choreo saga list``, the dashboard and the API read saga records through
``SagaQuery`` and nothing else, so a state store that keeps sagas elsewhere
(PostgreSQL) serves them by implementing these three methods. Pages run
newest first and continue from a ``Cursor`` (the last record's creation time
and id), so page 1000 costs what page 1 costs on a store with an index.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, NamedTuple, Protocol

from choreo.saga.definition import SagaState
from choreo.saga.record import SagaRecord
from choreo.saga.store import KEY_PREFIX, list_records

if TYPE_CHECKING:
    from brokers import State

__all__ = ("BrokerSagaQuery", "Cursor", "SagaQuery")


class Cursor(NamedTuple):
    """Where a page ended: the creation time and id of its last record."""

    created_at: float
    saga_id: str

    @classmethod
    def after(cls, record: SagaRecord) -> Cursor:
        return cls(record.created_at, record.saga_id)


class SagaQuery(Protocol):
    """Stored sagas as operators look at them."""

    async def get_record(self, saga_id: str) -> SagaRecord | None:
        """The stored record of one saga, or ``None``."""
        ...

    async def page_records(
        self,
        *,
        state: SagaState | None = None,
        name: str | None = None,
        after: Cursor | None = None,
        limit: int = 50,
    ) -> list[SagaRecord]:
        """Up to ``limit`` records, newest first, older than ``after`` if given."""
        ...

    async def count_records(self, *, name: str | None = None) -> dict[SagaState, int]:
        """How many sagas are in each state (states with none are left out)."""
        ...


class BrokerSagaQuery:
    """Sagas kept in a broker's state keys under ``prefix``.

    A broker's state has no secondary index, so each page reads every record
    under the prefix: fine for the thousands of sagas a broker usually holds
    at once; PostgreSQL state is the choice for millions.
    """

    def __init__(self, state: State, prefix: str = KEY_PREFIX) -> None:
        self._state = state
        self._prefix = prefix

    async def get_record(self, saga_id: str) -> SagaRecord | None:
        stored = await self._state.get_state(self._prefix + saga_id)
        return None if stored is None else SagaRecord.from_json(stored.value)

    async def page_records(
        self,
        *,
        state: SagaState | None = None,
        name: str | None = None,
        after: Cursor | None = None,
        limit: int = 50,
    ) -> list[SagaRecord]:
        records = await list_records(self._state, self._prefix, state)
        chosen = [
            r
            for r in reversed(records)
            if (name is None or r.name == name) and (after is None or Cursor.after(r) < after)
        ]
        return chosen[:limit]

    async def count_records(self, *, name: str | None = None) -> dict[SagaState, int]:
        records = await list_records(self._state, self._prefix)
        return dict(Counter(r.state for r in records if name is None or r.name == name))
