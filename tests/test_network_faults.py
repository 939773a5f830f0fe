"""Network faults between workers and Redis (catalogue T6 and T7).

Workers are real subprocesses; the producer talks to Redis directly, so
acknowledged jobs exist whatever the workers see. The ledger decides: every
job takes effect once (0 missing, 0 double), and the workers are back to work
by themselves after the fault heals.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator

import pytest

from choreo import Event
from choreo.testing import TestEnv, run_apps
from tests import ledger
from tests.apps.lab import app
from tests.fault_proxy import FaultProxy
from tests.redis_server import RedisServer
from tests.worker_process import WorkerProcess

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

OPTIONS = "visibility_timeout=1&claim_interval=0.25&max_deliveries=20"



@pytest.fixture
def proxy(server: RedisServer) -> Iterator[FaultProxy]:
    instance = FaultProxy(server.port).start()
    yield instance
    instance.stop()


class Producer:
    """Publishes numbered jobs in small batches at a steady pace, directly to Redis.

    ``jobs`` lists what was acknowledged; leaving the block lets the batch in
    flight finish, so nothing is published that is not listed.
    """

    def __init__(self, env: TestEnv, batch: int = 20, every: float = 0.05) -> None:
        self.env, self.batch, self.every = env, batch, every
        self.jobs: list[str] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while not self._stop.is_set():
            events = [Event(type="lab.job", data={"job": f"j{len(self.jobs) + i}"}) for i in range(self.batch)]
            await self.env.runtime.commit([(e, None) for e in events])
            self.jobs += [e.data["job"] for e in events]  # acknowledged: now they must take effect
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.every)

    async def __aenter__(self) -> Producer:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._stop.set()
        await self._task


async def drained(url: str, expected: list[str], timeout: float) -> float:
    """Seconds until every expected job took effect; fails with the ledger past ``timeout``."""
    started = time.monotonic()
    while True:
        report = ledger.check(expected, ledger.effects_in_redis(url))
        if not report.missing:
            return time.monotonic() - started
        assert time.monotonic() - started < timeout, report
        await asyncio.sleep(0.1)


async def phase(seconds: float) -> None:
    await asyncio.sleep(seconds)  # the fault lasts this long while the producer runs


async def test_latency_blackhole_and_resets_lose_nothing_and_workers_reconnect(
    server: RedisServer, proxy: FaultProxy
) -> None:
    """T7: through the proxy, 50 ms latency, a 3 s blackhole and connection resets: 0 missing,
    0 double, and the workers (their only way to Redis is the proxy) finish everything after the heal."""
    worker_url = f"redis://127.0.0.1:{proxy.port}/0?{OPTIONS}"
    url = f"{server.url}?{OPTIONS}"
    workers = [WorkerProcess("tests.apps.lab:app", "--broker", worker_url).start() for _ in range(2)]
    try:
        async with run_apps(broker=url) as env:
            async with Producer(env) as producer:
                await phase(1.0)
                proxy.latency = 0.05
                await phase(2.0)
                proxy.heal()
                proxy.blackhole = True
                await phase(3.0)
                proxy.heal()
                await phase(1.0)
                accepted = proxy.accepted
                proxy.reset()
                await phase(1.0)
                proxy.reset()
                await phase(1.0)
            recovered = await drained(url, producer.jobs, timeout=30)
            await asyncio.sleep(0.5)
            report = ledger.check(producer.jobs, ledger.effects_in_redis(url))
            assert report.ok, report
            assert proxy.accepted > accepted  # they reconnected after the resets
            print(f"T7: {len(producer.jobs)} jobs, drained {recovered:.2f}s after the last fault")
        for worker in workers:
            assert worker.process is not None and worker.process.poll() is None, worker.output
    finally:
        for worker in workers:
            worker.kill()


async def test_blackhole_then_heal_without_resets_recovers(server: RedisServer, proxy: FaultProxy) -> None:
    """T7: a 3 s blackhole whose connections are never reset: requests swallowed during it must not
    wedge a worker forever; after the heal every job takes effect once."""
    worker_url = f"redis://127.0.0.1:{proxy.port}/0?{OPTIONS}"
    url = f"{server.url}?{OPTIONS}"
    worker = WorkerProcess("tests.apps.lab:app", "--broker", worker_url).start()
    try:
        async with run_apps(broker=url) as env:
            async with Producer(env) as producer:
                await phase(1.0)
                proxy.blackhole = True
                await phase(3.0)
                proxy.heal()
                await phase(1.0)
            recovered = await drained(url, producer.jobs, timeout=40)
            report = ledger.check(producer.jobs, ledger.effects_in_redis(url))
            assert report.ok, report
            print(f"T7 blackhole: {len(producer.jobs)} jobs, drained {recovered:.2f}s after the heal")
    finally:
        worker.kill()


async def test_commit_swallowed_by_a_blackhole_does_not_wedge_its_handler(
    server: RedisServer, proxy: FaultProxy
) -> None:
    """T7: a commit sent into a blackhole that is healed but never reset times out on the client
    (redis-py's 5 s socket timeout), frees the handler, and the redelivery takes effect once."""
    url = f"redis://127.0.0.1:{proxy.port}/0?{OPTIONS}"
    effects = ledger.Recorder()
    async with run_apps(app, broker=url, middleware=[effects], grace=1) as env:
        await env.publish("lab.job", {"job": "a", "seconds": 0.6})
        await asyncio.sleep(0.3)  # the handler is running; its commit will go into the blackhole
        proxy.blackhole = True
        await asyncio.sleep(1.0)
        proxy.heal()
        healed = time.monotonic()
        while env.runtime.in_flight or effects.counts["a"] == 0:
            assert time.monotonic() - healed < 15, (env.runtime.in_flight, effects.counts)
            await asyncio.sleep(0.1)
        print(f"T7 swallowed commit: settled {time.monotonic() - healed:.1f}s after the heal")
    assert effects.counts == {"a": 1}
    assert ledger.effects_in_redis(server.url) == {"a": 1}
