"""PostgreSQL for choreo (extra ``choreo-saga[postgres]``, psycopg 3).

* ``PostgresStateStore``: saga records in PostgreSQL tables
  (``SagaCoordinator(app, state_store=PostgresStateStore(url))``), each
  transition one transaction with the commands it causes (an outbox).
* ``Database``: what ``choreo.run(..., database=url)`` attaches, so that a
  handler's ``async with ctx.transaction() as conn:`` commits its own writes,
  its emitted events and the record that the delivery was handled together.

Importing this package needs no psycopg; using it does.
"""

from choreo.postgres.database import DATABASE_URL_ENV, Database
from choreo.postgres.schema import SCHEMA_VERSION, upgrade
from choreo.postgres.state import PostgresStateStore

__all__ = ("DATABASE_URL_ENV", "SCHEMA_VERSION", "Database", "PostgresStateStore", "upgrade")
