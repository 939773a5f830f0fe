"""Reading stored sagas from a broker's state store: one, or a filtered list.

The coordinator and the operator's tools (``choreo saga list|status``) read
records the same way, so both see the same sagas, in the same order, with
the same step names, whether or not the saga's definition is loaded.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from choreo.errors import ConfigurationError, DecodeError
from choreo.saga.definition import SagaDefinition, SagaNotFound, SagaResult, SagaState
from choreo.saga.record import SagaRecord, to_result

if TYPE_CHECKING:
    from brokers import Broker, State

__all__ = ("KEY_PREFIX", "list_records", "list_sagas", "parse_state", "read_saga")

log = logging.getLogger("choreo.saga")

#: Where sagas are stored by default (``SagaCoordinator(key_prefix=...)``).
KEY_PREFIX = "saga:"


def parse_state(state: SagaState | str | None) -> SagaState | None:
    """``state`` as a ``SagaState`` (a name in any case, e.g. ``"FAILED"``); ``None`` stays ``None``.

    Raises:
        ConfigurationError: an unknown state name (a ``ValueError`` too).
    """
    if state is None or isinstance(state, SagaState):
        return state
    try:
        return SagaState(str(state).lower())
    except ValueError:
        names = ", ".join(s.value for s in SagaState)
        raise ConfigurationError(f"unknown saga state {state!r}: use one of {names}") from None


async def list_records(broker: State, prefix: str = KEY_PREFIX, state: SagaState | None = None) -> list[SagaRecord]:
    """Stored records under ``prefix``, oldest first, only those in ``state`` if given.

    A record that cannot be decoded is logged and left out, so one bad key
    hides no other saga.
    """
    records = []
    for key, item in (await broker.list_state(prefix)).items():
        try:
            record = SagaRecord.from_json(item.value)
        except DecodeError as exc:
            log.warning("skipping the saga record %s: %s", key, exc)
            continue
        if state is None or record.state is state:
            records.append(record)
    records.sort(key=lambda r: (r.created_at, r.saga_id))
    return records


async def list_sagas(
    broker: Broker,
    state: SagaState | str | None = None,
    *,
    prefix: str = KEY_PREFIX,
    definitions: Mapping[str, SagaDefinition] | None = None,
) -> list[SagaResult]:
    """Stored sagas, oldest first, only those in ``state`` if given.

    Raises:
        ConfigurationError: an unknown state name.
    """
    known = definitions or {}
    records = await list_records(broker, prefix, parse_state(state))
    return [to_result(known.get(record.name), record) for record in records]


async def read_saga(
    broker: Broker,
    saga_id: str,
    *,
    prefix: str = KEY_PREFIX,
    definitions: Mapping[str, SagaDefinition] | None = None,
) -> SagaResult:
    """One stored saga.

    Raises:
        SagaNotFound: no such saga.
        DecodeError: its record cannot be read.
    """
    stored = await broker.get_state(prefix + saga_id)
    if stored is None:
        raise SagaNotFound(f"no saga {saga_id!r}")
    record = SagaRecord.from_json(stored.value)
    return to_result((definitions or {}).get(record.name), record)
