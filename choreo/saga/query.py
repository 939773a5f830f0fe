"""Reading stored sagas a page at a time: the one question operators' tools ask.

``choreo saga list``, the dashboard and the API read saga records through
``SagaQuery`` and nothing else, so a state store that keeps sagas elsewhere
(PostgreSQL) serves them by implementing these three methods. Pages run
newest first and continue from a ``Cursor`` (the last record's creation time
and id), so page 1000 costs what page 1 costs on a store with an index.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections import Counter
from typing import TYPE_CHECKING, NamedTuple, Protocol

from choreo.errors import DecodeError
from choreo.saga.definition import SagaState
from choreo.saga.record import SagaRecord
from choreo.saga.store import KEY_PREFIX

if TYPE_CHECKING:
    from brokers import State

__all__ = ("BrokerSagaQuery", "Cursor", "SagaQuery")

log = logging.getLogger("choreo.saga")


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


class _Summary(NamedTuple):
    """What paging and counting need of a record, without the record."""

    created_at: float
    saga_id: str
    state: SagaState
    name: str


class BrokerSagaQuery:
    """Sagas kept in a broker's state keys under ``prefix``.

    A broker's state has no secondary index, so each call reads every record
    under the prefix: fine for the thousands of sagas a broker usually holds
    at once; PostgreSQL state is the choice for millions.

    What a call decodes is kept, though: each record's summary (creation
    time, id, state, name) is remembered with the version, length and hash
    of the stored bytes, and a record whose bytes did not change is not
    decoded again; a page decodes only the records it returns; and calls
    made together share one read. Measured with 100k sagas in Redis
    (``bench/dashboard_pages.py``, a loaded 2-core machine), decoding every
    record on each call cost about 10 s of CPU per dashboard page (a page
    and its counts, each reading everything); with the summaries kept and
    the read shared, a page costs about what one read of the keys does.
    The summaries take about 200 bytes a saga.
    """

    def __init__(self, state: State, prefix: str = KEY_PREFIX) -> None:
        self._state = state
        self._prefix = prefix
        #: key -> ((version, length, hash) of the stored bytes, its summary or None if it cannot be read).
        self._known: dict[str, tuple[tuple[int, int, int], _Summary | None]] = {}
        self._reading: asyncio.Future[list[tuple[_Summary, bytes]]] | None = None

    async def get_record(self, saga_id: str) -> SagaRecord | None:
        stored = await self._state.get_state(self._prefix + saga_id)
        return None if stored is None else SagaRecord.from_json(stored.value)

    async def _listing(self) -> list[tuple[_Summary, bytes]]:
        """Every readable record's summary and stored bytes. Calls made while
        a read is on the wire share it (a page and its counts, asked for
        together, read the store once)."""
        if self._reading is None:
            self._reading = asyncio.ensure_future(self._read())
            self._reading.add_done_callback(self._read_done)
        return await asyncio.shield(self._reading)

    def _read_done(self, reading: asyncio.Future[list[tuple[_Summary, bytes]]]) -> None:
        if self._reading is reading:
            self._reading = None

    async def _read(self) -> list[tuple[_Summary, bytes]]:
        known: dict[str, tuple[tuple[int, int, int], _Summary | None]] = {}
        found = []
        for key, item in (await self._state.list_state(self._prefix)).items():
            stamp = (item.version, len(item.value), hash(item.value))
            cached = self._known.get(key)
            if cached is not None and cached[0] == stamp:
                summary = cached[1]
            else:
                try:
                    record = SagaRecord.from_json(item.value)
                except DecodeError as exc:
                    log.warning("skipping the saga record %s: %s", key, exc)
                    summary = None
                else:
                    summary = _Summary(record.created_at, record.saga_id, record.state, record.name)
            known[key] = (stamp, summary)
            if summary is not None:
                found.append((summary, item.value))
        self._known = known  # keys gone from the store are forgotten
        return found

    async def page_records(
        self,
        *,
        state: SagaState | None = None,
        name: str | None = None,
        after: Cursor | None = None,
        limit: int = 50,
    ) -> list[SagaRecord]:
        chosen = [
            (summary, raw)
            for summary, raw in await self._listing()
            if (state is None or summary.state is state)
            and (name is None or summary.name == name)
            and (after is None or (summary.created_at, summary.saga_id) < after)
        ]
        newest = heapq.nlargest(limit, chosen, key=lambda pair: (pair[0].created_at, pair[0].saga_id))
        return [SagaRecord.from_json(raw) for _, raw in newest]

    async def count_records(self, *, name: str | None = None) -> dict[SagaState, int]:
        listing = await self._listing()
        return dict(Counter(summary.state for summary, _ in listing if name is None or summary.name == name))
