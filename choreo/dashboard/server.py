"""Running the dashboard: the saga store behind ``--database``, and uvicorn.

``choreo dashboard`` only parses its options and calls ``run``; tests and
embedding code call ``serve`` with an app from ``create_app`` and a bound
socket, in their own event loop (the in-memory broker lives in one process,
so its dashboard must be served next to its apps).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import signal
import socket
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlunsplit

from choreo.dashboard.app import create_app, redact
from choreo.errors import ConfigurationError

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from choreo.app import App
    from choreo.saga.query import SagaQuery

__all__ = ("DEFAULT_HOST", "DEFAULT_PORT", "bind", "database_query", "hosts_for", "run", "serve", "url_of")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8600
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
log = logging.getLogger("choreo.dashboard")


def database_query(url: str) -> SagaQuery:
    """The ``SagaQuery`` of the PostgreSQL state store at ``url``
    (``choreo.postgres.PostgresStateStore``), imported only when asked for.

    Raises:
        ConfigurationError: this installation has no PostgreSQL state store.
    """
    try:
        module = importlib.import_module("choreo.postgres")
    except ImportError as exc:
        raise ConfigurationError(
            f"--database {redact(url)}: PostgreSQL state is not available in this installation ({exc})"
        ) from None
    store: Any = module.PostgresStateStore(url)
    return store  # type: ignore[no-any-return]


async def serve(app: Starlette, sock: socket.socket, *, log_level: str = "warning", signals: bool = False) -> None:
    """Serve ``app`` on the bound socket ``sock`` until cancelled, or with
    ``signals`` (main thread only) until SIGINT or SIGTERM; either way open
    requests finish and the app's shutdown runs before this returns."""
    import uvicorn

    class Server(uvicorn.Server):
        # Signals are the caller's to handle: uvicorn would re-raise them
        # after shutting down, and a stopped dashboard is a clean exit.
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

        def install_signal_handlers(self) -> None:
            return None

    server = Server(uvicorn.Config(app, log_level=log_level, ws="none", lifespan="on", access_log=False))
    loop = asyncio.get_running_loop()
    stops = (signal.SIGINT, signal.SIGTERM) if signals else ()
    for number in stops:
        loop.add_signal_handler(number, setattr, server, "should_exit", True)
    serving = asyncio.ensure_future(server.serve(sockets=[sock]))
    try:
        await asyncio.shield(serving)
    except asyncio.CancelledError:
        server.should_exit = True
        await serving
        raise
    finally:
        for number in stops:
            loop.remove_signal_handler(number)


async def run(
    broker: str,
    *,
    apps: Sequence[App] = (),
    database: str | None = None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    allow_actions: bool = False,
    announce: Any = print,
) -> None:
    """What ``choreo dashboard`` does: build the app, bind, say where, serve.

    Raises:
        ConfigurationError: an invalid broker URL, or ``--database`` without
            PostgreSQL state.
        OSError: the address cannot be bound.
    """
    sagas = None if database is None else database_query(database)
    if sagas is not None:
        connect = getattr(sagas, "connect", None)
        if connect is not None:
            await connect()
    app = create_app(broker, sagas=sagas, apps=apps, allow_actions=allow_actions, allowed_hosts=hosts_for(host),
                     database=database)
    with bind(host, port) as sock:
        shown = url_of(host, sock.getsockname()[1])
        announce(f"choreo dashboard on {shown} (broker {app.state.dashboard.broker.url}"
                 f"{'' if database is None else ', sagas from ' + redact(database)}"
                 f"{', actions allowed' if allow_actions else ''}); Ctrl+C stops it")
        await serve(app, sock, signals=True)


def url_of(host: str, port: int) -> str:
    """Where a dashboard bound to ``host``:``port`` is opened."""
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return urlunsplit(("http", f"{shown}:{port}", "/sagas", "", ""))


def bind(host: str, port: int) -> socket.socket:
    """A listening socket for the dashboard (``port`` 0: a free one).

    Raises:
        OSError: the address is taken or cannot be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError:
        sock.close()
        raise
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def hosts_for(host: str) -> list[str] | None:
    """The Host headers to accept for a dashboard bound to ``host``: loopback
    names only on a loopback address, any otherwise."""
    return list(LOOPBACK_HOSTS) if host in LOOPBACK_HOSTS else None
