"""Named failpoints: parsed once, free when unset, and each crash point keeps its promise.

The structural tests read the library's source: every call of ``hit`` sits
under ``if ACTIVE:`` (so an unset point is one truth test of an empty dict)
and names a documented point. The behaviour tests arm points in-process
(``raise``) and in real worker subprocesses (``kill``) and check the ledger.
"""

from __future__ import annotations

import ast
import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from choreo import Event, failpoints
from choreo.errors import ConfigurationError
from choreo.testing import run_apps
from tests import ledger
from tests.apps.lab import app
from tests.redis_server import RedisServer
from tests.worker_process import ROOT, WorkerProcess

pytestmark = pytest.mark.anyio


def hit_calls() -> Iterator[tuple[Path, ast.Call, list[ast.AST]]]:
    """Every ``hit(...)`` call in the library, with its ancestors."""
    for path in sorted((ROOT / "choreo").rglob("*.py")) + sorted((ROOT / "brokers").rglob("*.py")):
        if path.name == "failpoints.py":
            continue
        tree = ast.parse(path.read_text())

        def walk(node: ast.AST, parents: list[ast.AST]) -> Iterator[tuple[ast.Call, list[ast.AST]]]:
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "hit":
                yield node, parents
            for child in ast.iter_child_nodes(node):
                yield from walk(child, [*parents, node])

        for call, parents in walk(tree, []):
            yield path, call, parents


def test_every_failpoint_is_guarded_by_active_and_documented() -> None:
    """Unset failpoints cost one truth test: each hit() is under `if ACTIVE:` and names a listed point."""
    calls = list(hit_calls())
    names = set()
    for path, call, parents in calls:
        guard = next((p for p in reversed(parents) if isinstance(p, ast.If)), None)
        where = f"{path.relative_to(ROOT)}:{call.lineno}"
        assert guard is not None, f"{where}: hit() outside an if"
        assert isinstance(guard.test, ast.BoolOp | ast.Name), where
        first = guard.test.values[0] if isinstance(guard.test, ast.BoolOp) else guard.test
        assert isinstance(first, ast.Name) and first.id == "ACTIVE", f"{where}: guard must start with ACTIVE"
        assert isinstance(call.args[0], ast.Constant), where
        names.add(call.args[0].value)
    assert names == set(failpoints.POINTS)


def test_unset_environment_arms_nothing() -> None:
    """Without CHOREO_FAILPOINTS (as in this test run) the armed set is empty, so every guard is false."""
    code = "from choreo import failpoints, outbox, worker; assert failpoints.ACTIVE == {} and not outbox.ACTIVE"
    env = {k: v for k, v in os.environ.items() if k != "CHOREO_FAILPOINTS"}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)})


def test_spec_parses_actions_and_scopes_and_rejects_typos() -> None:
    """name[:scope]=kill|raise|sleep(s)|stall(s), separated by ; or ,; unknown points are a ConfigurationError."""
    points = failpoints.parse("dispatcher.before_commit=kill; dispatcher.after_commit:lab.work=sleep(0.5),"
                              "worker.after_fetch=stall(2)")
    assert {k: (p.action, p.seconds) for k, p in points.items()} == {
        "dispatcher.before_commit": ("kill", 0.0),
        "dispatcher.after_commit:lab.work": ("sleep", 0.5),
        "worker.after_fetch": ("stall", 2.0),
    }
    for bad in ("dispatcher.before_comit=kill", "dispatcher.before_commit=explode", "worker.after_fetch"):
        with pytest.raises(ConfigurationError):
            failpoints.parse(bad)


@pytest.fixture
def armed() -> Iterator[None]:
    yield
    failpoints.configure("")


async def test_raise_before_commit_leaves_the_delivery_for_redelivery(armed: None) -> None:
    """A failure after the handler and before the commit commits nothing; the redelivery takes effect once."""
    effects = ledger.Recorder()
    async with run_apps(app, broker="memory://?visibility_timeout=0.3", middleware=[effects]) as env:
        failpoints.configure("dispatcher.before_commit:lab.work=raise")
        await env.publish("lab.job", {"job": "a"})
        with pytest.raises(TimeoutError):
            await env.settle(timeout=0.5)
        assert effects.counts == {}
        failpoints.configure("")
        await env.settle(timeout=5)
        assert ledger.check(["a"], effects.counts).ok


async def test_scope_limits_a_point_to_one_group(armed: None) -> None:
    """A scoped point fires only for its group: another group's commits go through."""
    failpoints.configure("dispatcher.before_commit:other.group=raise")
    async with run_apps(app) as env:
        await env.publish("lab.job", {"job": "a"})
        await env.settle(timeout=5)
        assert ledger.check(["a"], ledger.effects_in_events(env.published())).ok


# -- kill -9 at each crash point, in real worker subprocesses on Redis --------------------------------

VT = 1.0
URL_OPTIONS = f"visibility_timeout={VT}&claim_interval=0.25&max_deliveries=10"



def worker(url: str, points: str = "") -> WorkerProcess:
    os.environ["CHOREO_FAILPOINTS"] = points
    try:
        return WorkerProcess("tests.apps.lab:app", "--broker", url).start()
    finally:
        del os.environ["CHOREO_FAILPOINTS"]


@pytest.mark.redis
@pytest.mark.parametrize("point", ["worker.after_fetch", "dispatcher.before_commit", "dispatcher.after_commit"])
async def test_kill_at_crash_point_loses_nothing_and_applies_once(
    server: RedisServer, tmp_path: Path, point: str
) -> None:
    """kill -9 at a crash point: a survivor finishes every job within the lease plus two claim
    intervals; a body reruns only if the crash came before its commit; 0 missing, 0 double."""
    url = f"{server.url}?{URL_OPTIONS}"
    runs = tmp_path / "runs"
    expected = [f"j{i}" for i in range(20)]
    doomed = worker(url, f"{point}=kill")
    survivor = None
    try:
        async with run_apps(broker=url) as producer:
            await producer.runtime.commit(
                [(Event(type="lab.job", data={"job": job, "ledger": str(runs)}), None) for job in expected]
            )
            assert doomed.process is not None
            assert doomed.process.wait(timeout=10) == -9
            killed_at = time.monotonic()
            survivor = worker(url)
            ready_at = time.monotonic()
            while not ledger.check(expected, ledger.effects_in_redis(url)).ok:
                assert time.monotonic() - killed_at < 20, ledger.check(expected, ledger.effects_in_redis(url))
                await asyncio.sleep(0.05)
            done_at = time.monotonic()
            await asyncio.sleep(0.5)  # anything late would show up as double
            report = ledger.check(expected, ledger.effects_in_redis(url))
            assert report.ok, report
        assert doomed.process is not None
        pid = doomed.process.pid
        began_in_doomed = ledger.executions(runs, pid)
        committed_by_doomed = {d["job"] for d in ledger.effect_data_in_redis(url) if d["by"] == pid}
        runs_per_job = ledger.executions(runs)
        if point == "worker.after_fetch":  # died holding fetched entries it never handled
            assert not began_in_doomed and set(runs_per_job.values()) == {1}
        elif point == "dispatcher.before_commit":  # every body it ran is run again by the survivor
            assert began_in_doomed and not committed_by_doomed
            assert all(runs_per_job[job] == 2 for job in began_in_doomed)
        else:  # what it committed before dying is never run again
            assert committed_by_doomed and all(runs_per_job[job] == 1 for job in committed_by_doomed)
        print(f"{point}: all jobs done {done_at - killed_at:.2f}s after the kill, "
              f"{done_at - ready_at:.2f}s after the survivor started")
        # The entries have been idle since the kill: the survivor's first claim sweep takes them.
        assert done_at - ready_at < VT + 2 * 0.25 + 1.0
    finally:
        doomed.kill()
        if survivor is not None:
            survivor.kill()
