"""pytest fixtures to run choreo apps in tests, on memory or Redis.

Registered through the ``pytest11`` entry point, so installing choreo is
enough. ``pytest --choreo-broker redis://localhost:6379/15`` runs the same
tests on Redis; each test gets its own key prefix there, so tests do not see
each other's streams (and nothing is flushed).

Example::

    async def test_order_is_reserved(choreo_run):
        async with choreo_run(inventory) as env:
            await env.publish("order.created", {"order_id": "O-1"})
            await env.settle()
            assert env.published("inventory.reserved")

Async tests need an async runner, installed alongside: anyio (its pytest
plugin) or pytest-asyncio.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from choreo.app import App
    from choreo.testing import TestEnv

__all__ = ("choreo_broker_url", "choreo_run", "pytest_addoption")

RunApps = Callable[..., contextlib.AbstractAsyncContextManager["TestEnv"]]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("choreo")
    group.addoption(
        "--choreo-broker",
        action="store",
        default=None,
        metavar="URL",
        help="Broker URL for the choreo fixtures (default memory://; e.g. redis://localhost:6379/15).",
    )


def _isolated(url: str) -> str:
    if not url.startswith(("redis://", "rediss://")) or "prefix=" in url:
        return url
    return url + ("&" if "?" in url else "?") + f"prefix=choreo-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def choreo_broker_url(request: pytest.FixtureRequest) -> str:
    """The broker URL the choreo fixtures use: ``--choreo-broker`` or
    ``memory://``; on Redis with a key prefix of its own for this test."""
    url = request.config.getoption("--choreo-broker") or "memory://"
    return _isolated(str(url))


@pytest.fixture
def choreo_run(choreo_broker_url: str) -> RunApps:
    """``choreo.testing.run_apps`` on the broker of this test run:
    ``async with choreo_run(app1, app2) as env: ...``."""
    from choreo.testing import run_apps

    @contextlib.asynccontextmanager
    async def run(*apps: App, **options: Any) -> AsyncIterator[TestEnv]:
        async with run_apps(*apps, broker=choreo_broker_url, **options) as env:
            yield env

    return run
