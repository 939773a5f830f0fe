"""``Database``: the connections choreo keeps to one PostgreSQL database.

A small pool of psycopg ``AsyncConnection``s in autocommit mode (choreo sends
``BEGIN`` and ``COMMIT`` itself, in the same round trips as its statements),
the schema check on first use, and the mapping of psycopg's failures to
choreo's: a connection that fails is ``DatabaseUnavailable`` (the handler runs
again after a pause, the delivery keeps its lease), a serialization failure
or deadlock is ``TransactionConflict`` (it runs again at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from choreo.errors import ConfigurationError, DatabaseUnavailable, TransactionConflict
from choreo.options import DATABASE_URL_ENV
from choreo.postgres.schema import upgrade

if TYPE_CHECKING:
    from psycopg import AsyncConnection

__all__ = ("DATABASE_URL_ENV", "Database", "database_errors", "redact", "resolve_url")



def resolve_url(url: str | None) -> str:
    """``url``, else ``CHOREO_DATABASE_URL``.

    Raises:
        ConfigurationError: neither is set, or it is not a postgresql:// URL.
    """
    found = url or os.environ.get(DATABASE_URL_ENV)
    if not found:
        raise ConfigurationError(f"no database URL: pass one (postgresql://...) or set {DATABASE_URL_ENV}")
    if not found.startswith(("postgresql://", "postgres://")):
        raise ConfigurationError(f"database URL {redact(found)!r} must start with postgresql://")
    return found


def redact(url: str) -> str:
    """``url`` without its password, safe to log."""
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        raise ConfigurationError("PostgreSQL support needs psycopg: pip install 'choreo-saga[postgres]'") from None
    return psycopg


@contextlib.contextmanager
def database_errors(url: str) -> Any:
    """Map psycopg's connection and transaction-rollback errors to choreo's."""
    psycopg = _psycopg()
    try:
        yield
    except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
        state = getattr(exc, "sqlstate", None) or ""
        if state.startswith("40"):  # serialization failure, deadlock
            raise TransactionConflict(f"{type(exc).__name__}: {exc}") from exc
        if not state or state.startswith(("08", "57P")):  # no connection, or the server going away
            raise DatabaseUnavailable(f"{redact(url)}: {type(exc).__name__}: {exc}") from exc
        raise


class Database:
    """Pooled connections to one PostgreSQL database, its schema made current on first use.

    Args:
        url: ``postgresql://user:password@host:port/dbname``; ``None``:
            ``CHOREO_DATABASE_URL`` when first connected.
        pool_size: Connections open at most; callers beyond it wait.
    """

    def __init__(self, url: str | None = None, *, pool_size: int = 10) -> None:
        if pool_size < 1:
            raise ConfigurationError("pool_size must be at least 1")
        self._url = url
        self.pool_size = pool_size
        self._idle: list[AsyncConnection[Any]] = []
        self._slots: asyncio.Semaphore | None = None
        self._ready = False
        self._users = 0

    @property
    def url(self) -> str:
        """The URL (``CHOREO_DATABASE_URL`` when none was given).

        Raises:
            ConfigurationError: no URL anywhere, or not postgresql://.
        """
        return resolve_url(self._url)

    def __repr__(self) -> str:
        return f"Database({redact(self._url) if self._url else DATABASE_URL_ENV!r})"

    async def open(self) -> None:
        """Start using the database: check it can be reached and bring the
        schema up to date (once per ``Database``). Pair with ``close``.

        Raises:
            ConfigurationError: no URL, no psycopg, or a user without the
                right to create the tables that are missing.
            DatabaseUnavailable: the database cannot be reached.
        """
        self._users += 1
        if self._ready:
            return
        try:
            async with self.connection() as conn:
                await upgrade(conn)
        except BaseException:
            self._users -= 1
            raise
        self._ready = True

    async def close(self) -> None:
        """Stop using the database; the last user closes the connections."""
        self._users = max(0, self._users - 1)
        if self._users:
            return
        idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(Exception):
                await conn.close()
        self._ready = False

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[AsyncConnection[Any]]:
        """A connection of the pool, in autocommit mode, for one piece of work.

        A connection left inside a transaction, or one that failed, is
        closed rather than handed out again.

        Raises:
            DatabaseUnavailable: the database cannot be reached (also when
                the connection breaks while in use).
            TransactionConflict: a serialization failure or deadlock.
        """
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.pool_size)
        psycopg = _psycopg()
        url = self.url
        async with self._slots:
            with database_errors(url):
                conn = self._idle.pop() if self._idle else await psycopg.AsyncConnection.connect(url, autocommit=True)
            clean = False
            try:
                with database_errors(url):
                    yield conn
                clean = not conn.closed and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            finally:
                if clean:
                    self._idle.append(conn)
                else:
                    await _discard(conn)


async def _discard(conn: AsyncConnection[Any]) -> None:
    # Closing rolls back whatever the server still holds for this session.
    with contextlib.suppress(Exception):
        await asyncio.shield(conn.close())
