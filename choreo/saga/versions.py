"""Several versions of one saga, live at once.

``start_saga`` starts a saga on the highest version of its name; a saga in
flight finishes on the version it started with (``SagaRecord.version``), so
a deploy may change a saga's steps while instances are running, provided
the old version stays defined until they end. A reply, timer or resume for a
version that is no longer defined leaves the saga as it is: it is logged and
counted in ``choreo_saga_version_missing_total{saga,version}``, and
``choreo check TARGET... --broker URL`` lists such sagas (see ``stranded``)
so a deploy pipeline can refuse to ship.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import attrs

from choreo.errors import ConfigurationError
from choreo.lifecycle import Running
from choreo.saga.definition import SagaDefinition
from choreo.saga.metrics import SagaMetrics
from choreo.saga.record import SagaRecord

__all__ = ("SagaVersions", "Stranded", "stranded", "version_missing")

log = logging.getLogger("choreo.saga")


class SagaVersions:
    """The definitions of one coordinator, by saga name and version."""

    def __init__(self) -> None:
        self._by_name: dict[str, dict[int, SagaDefinition]] = {}

    def add(self, definition: SagaDefinition) -> None:
        """Add a version of a saga.

        Raises:
            ConfigurationError: that version of that saga is already defined.
        """
        versions = self._by_name.setdefault(definition.name, {})
        if definition.version in versions:
            raise ConfigurationError(f"saga {definition.name!r} version {definition.version} is already defined")
        versions[definition.version] = definition

    def latest(self, name: str) -> SagaDefinition | None:
        """The highest version of saga ``name``, if any."""
        versions = self._by_name.get(name)
        return versions[max(versions)] if versions else None

    def get(self, name: str, version: int) -> SagaDefinition | None:
        """Version ``version`` of saga ``name``, if defined."""
        return self._by_name.get(name, {}).get(version)

    def of(self, name: str) -> tuple[SagaDefinition, ...]:
        """Every version of saga ``name``, lowest first."""
        versions = self._by_name.get(name, {})
        return tuple(versions[v] for v in sorted(versions))

    def commands(self, name: str) -> tuple[str, ...]:
        """Every command topic any version of saga ``name`` may publish."""
        return tuple(dict.fromkeys(topic for definition in self.of(name) for topic in definition.commands()))

    def defined(self) -> set[tuple[str, int]]:
        """Every ``(name, version)`` defined here."""
        return {(name, version) for name, versions in self._by_name.items() for version in versions}


@attrs.frozen
class Stranded:
    """A saga in flight on a version that the deployed definitions no longer have."""

    saga_id: str
    name: str
    version: int
    state: str

    def __str__(self) -> str:
        return (
            f"stranded-saga: saga {self.saga_id} ({self.name} version {self.version}, {self.state}) "
            f"is in flight on a version no target defines; keep that version until it ends"
        )


def stranded(records: Iterable[SagaRecord], defined: set[tuple[str, int]]) -> list[Stranded]:
    """The sagas of ``records`` still in flight on a ``(name, version)`` not in ``defined``."""
    return [
        Stranded(r.saga_id, r.name, r.version, r.state.value)
        for r in records
        if not r.state.terminal and (r.name, r.version) not in defined
    ]


def version_missing(versions: SagaVersions, runtime: Running, record: SagaRecord, what: str) -> None:
    """A reply, timer or resume found ``record`` on a version not defined
    here: log it and count it; the saga is left as it is."""
    defined = ", ".join(str(d.version) for d in versions.of(record.name)) or "none"
    log.warning(
        "[SAGA-%s] %s for saga %s version %d, which is not defined here (defined: %s); the saga is left as it is",
        record.saga_id, what, record.name, record.version, defined,
    )
    SagaMetrics.count_version_missing(runtime.middleware, record.name, record.version)
