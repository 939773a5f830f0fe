"""Fixtures shared by the whole suite.

``broker_url`` is parametrized over the in-memory broker, a private
redis-server and a private Redis Cluster (3 masters, 3 replicas), so every
test that takes it runs on all three. The server and the cluster are started
once per session on free ports and flushed before each test; tests that
fault Redis itself start their own ``RedisServer`` or ``RedisCluster``.

PostgreSQL likewise: one private cluster per session (``postgres_server``,
initdb into a temp dir, on a free port; never the machine's own server), a
fresh database per test (``database_url``); tests that fault PostgreSQL
start their own ``PostgresServer``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

import brokers
from tests.postgres_server import PostgresServer
from tests.redis_cluster import RedisCluster
from tests.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    cluster = RedisCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def start_redis() -> Iterator[Callable[..., RedisServer]]:
    """Start private redis-servers (``RedisServer`` options) that a test may kill,
    pause or restart; every one is stopped at teardown."""
    started: list[RedisServer] = []

    def start(**options: Any) -> RedisServer:
        instance = RedisServer(**options)
        started.append(instance)
        instance.start()
        return instance

    yield start
    for instance in started:
        instance.stop()


@pytest.fixture
def server(start_redis: Callable[..., RedisServer]) -> RedisServer:
    """A private redis-server with AOF (everysec), as production should run it."""
    return start_redis(appendonly=True)


@pytest.fixture
def fsync_server(start_redis: Callable[..., RedisServer]) -> RedisServer:
    """A private redis-server with ``appendfsync always``: every acknowledged write is on disk."""
    return start_redis(appendonly=True, appendfsync="always")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer()
    server.start()
    yield server
    server.close()


@pytest.fixture
def database_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A new empty database on the session's PostgreSQL, dropped afterwards."""
    url = postgres_server.create_database()
    yield url
    name = url.rsplit("/", 1)[1]
    postgres_server.sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def start_postgres() -> Iterator[Callable[[], PostgresServer]]:
    """Start private PostgreSQL clusters that a test may kill or restart; all
    are removed at teardown."""
    started: list[PostgresServer] = []

    def start() -> PostgresServer:
        instance = PostgresServer()
        started.append(instance)
        instance.start()
        return instance

    yield start
    for instance in started:
        instance.close()


@pytest.fixture(params=["memory", "redis", "cluster"])
def broker_url(request: pytest.FixtureRequest) -> str:
    """A broker URL, once per broker kind; Redis is empty at the start."""
    if request.param == "memory":
        return "memory://"
    if request.param == "cluster":
        cluster: RedisCluster = request.getfixturevalue("redis_cluster")
        cluster.flush()
        return cluster.url
    server: RedisServer = request.getfixturevalue("redis_server")
    server.command("FLUSHALL")
    return server.url


@pytest.fixture
def fast_broker_url(broker_url: str) -> str:
    """The same broker with short leases, for tests about redelivery."""
    return broker_url + ("&" if "?" in broker_url else "?") + "visibility_timeout=0.5&max_deliveries=3"


@pytest.fixture
async def broker(broker_url: str) -> AsyncIterator[brokers.Broker]:
    """A connected broker of each kind."""
    instance = brokers.from_url(broker_url)
    await instance.connect()
    try:
        yield instance
    finally:
        await instance.close()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(collector: pytest.Collector, name: str, obj: object) -> None:
    # Every coroutine test runs on asyncio through anyio's plugin; the mark is
    # put on the function before collection so parametrized fixtures still apply.
    import inspect

    if inspect.iscoroutinefunction(obj) and name.startswith("test"):
        pytest.mark.anyio(obj)
