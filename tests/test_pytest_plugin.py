"""The pytest plugin: registered by entry point, runs apps on memory or Redis."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from tests.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent

USER_TEST = '''
import pytest
from choreo import App

app = App("greeter")

@app.on_event("user.joined")
@app.emits("user.greeted")
async def greet(data: dict) -> dict:
    return {"greeting": "hello " + data["name"]}

@pytest.mark.anyio
async def test_greets(choreo_run, choreo_broker_url):
    async with choreo_run(app) as env:
        await env.publish("user.joined", {"name": "ada"})
        await env.settle(timeout=5)
        [event] = env.published("user.greeted")
        assert event.data["greeting"] == "hello ada"
    print("BROKER", choreo_broker_url)

@pytest.fixture
def anyio_backend():
    return "asyncio"
'''


def plugin_installed() -> bool:
    """Whether an installed distribution already registers the plugin by entry point."""
    return any(ep.value == "choreo.pytest_plugin" for ep in entry_points(group="pytest11"))


def run_user_tests(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_user.py").write_text(USER_TEST)
    # From a source checkout the entry point is not installed: load the plugin by name instead.
    load = [] if plugin_installed() else ["-p", "choreo.pytest_plugin"]
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", *load, "-p", "no:cacheprovider",
         "--rootdir", str(tmp_path), str(tmp_path / "test_user.py"), *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_plugin_is_registered_as_a_pytest11_entry_point() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["pytest11"] == {"choreo": "choreo.pytest_plugin"}


def test_fixture_runs_apps_on_memory_by_default(tmp_path: Path) -> None:
    result = run_user_tests(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BROKER memory://" in result.stdout


@pytest.mark.redis
def test_option_runs_the_same_test_on_redis_with_a_prefix_of_its_own(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    result = run_user_tests(tmp_path, "--choreo-broker", redis_server.url)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"BROKER {redis_server.url}?prefix=choreo-test-" in result.stdout
