"""A web dashboard over a running system: sagas, one saga's timeline, one
choreographed transaction, dead letters and the live event flow.

Needs the ``dashboard`` extra (``pip install 'choreo-saga[dashboard]'``).
``choreo dashboard`` serves it; ``create_app`` returns the ASGI app for a
broker (a URL, or the instance the apps of this process run on) and
``serve`` runs it on a bound socket in the caller's event loop.
"""

from __future__ import annotations

from choreo.dashboard.app import Dashboard, create_app, redact
from choreo.dashboard.server import DEFAULT_HOST, DEFAULT_PORT, bind, database_query, run, serve

__all__ = ("DEFAULT_HOST", "DEFAULT_PORT", "Dashboard", "bind", "create_app", "database_query", "redact", "run",
           "serve")
