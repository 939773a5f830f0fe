"""``RuntimeOptions``: how a runtime runs, as one record.

``choreo.run``, ``choreo.testing.run_apps``, ``Runtime``, ``serve`` and
``choreo worker`` all take these options, by keyword or as a record, so each
option is declared, defaulted and checked here only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from choreo.errors import ConfigurationError
from choreo.events import DEFAULT_MAX_SIZE
from choreo.lifecycle import Lifespan
from choreo.middleware import Middleware

__all__ = ("DATABASE_URL_ENV", "DEFAULT_CONCURRENCY", "RuntimeOptions")

#: Where the database URL comes from when none is given (``database=``,
#: ``PostgresStateStore(url=None)``, ``--database``).
DATABASE_URL_ENV = "CHOREO_DATABASE_URL"

#: Handlers running at once per runtime, and so the most entries one fetch
#: asks for. Measured with bench/worker_process.py (a ``choreo worker``
#: process on a 3-hop chain, 2 cores): 64 gave ~15.5k handled events/s,
#: 200 ~21k, 500 ~24k and 1000 no more than 500. Fewer in flight means
#: smaller reads and commit batches, so more round trips per event.
DEFAULT_CONCURRENCY = 500


def _at_least(low: float, strict: bool = False) -> Any:
    def check(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
        if value < low or (strict and value == low):
            bound = "greater than" if strict else "at least"
            raise ConfigurationError(f"{attribute.name} must be {bound} {low}, not {value!r}")

    return check


def _middleware(items: Iterable[Middleware]) -> tuple[Middleware, ...]:
    return tuple(items)


def _lifespans(items: Iterable[Lifespan]) -> tuple[Lifespan, ...]:
    return tuple(items)


@attrs.frozen
class RuntimeOptions:
    """How apps run in one process.

    Attributes:
        concurrency: Handlers running at once in this runtime.
        grace: Seconds to let in-flight handlers finish when stopping; the
            rest are cancelled and redelivered later.
        consumer: This consumer's name (default: host, pid and a serial).
        middleware: Observers of what is published and handled.
        max_size: Largest encoded event, in bytes, published or accepted.
        poll_interval: Seconds a fetch waits for messages before looking again.
        lifespan: Hooks of this run, entered before the apps' own (see
            ``choreo.lifecycle``).
        database: A PostgreSQL URL: handlers may then open
            ``ctx.transaction()`` (see ``choreo.postgres.handlers``); ``None``:
            ``CHOREO_DATABASE_URL`` if set, else no database.

    Raises:
        ConfigurationError: an option out of range.
    """

    concurrency: int = attrs.field(default=DEFAULT_CONCURRENCY, validator=_at_least(1))
    grace: float = attrs.field(default=10.0, validator=_at_least(0))
    consumer: str | None = None
    middleware: tuple[Middleware, ...] = attrs.field(default=(), converter=_middleware)
    max_size: int = attrs.field(default=DEFAULT_MAX_SIZE, validator=_at_least(1))
    poll_interval: float = attrs.field(default=0.1, validator=_at_least(0, strict=True))
    lifespan: tuple[Lifespan, ...] = attrs.field(default=(), converter=_lifespans)
    database: str | None = None

    @classmethod
    def of(cls, options: RuntimeOptions | None = None, /, **overrides: Any) -> RuntimeOptions:
        """``options`` (default: the defaults) with ``overrides`` applied:
        what functions taking both a record and keywords build.

        Raises:
            TypeError: an override that is not an option.
            ConfigurationError: an option out of range.
        """
        base = options if options is not None else cls()
        if not overrides:
            return base
        unknown = sorted(set(overrides) - set(attrs.fields_dict(cls)))
        if unknown:
            raise TypeError(f"unexpected keyword arguments {unknown}; options are {sorted(attrs.fields_dict(cls))}")
        return attrs.evolve(base, **overrides)

    def with_middleware(self, middleware: Sequence[Middleware]) -> RuntimeOptions:
        """These options with ``middleware`` added before the configured ones."""
        return attrs.evolve(self, middleware=(*middleware, *self.middleware))
