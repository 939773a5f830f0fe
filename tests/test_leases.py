"""Leases: slow handlers (catalogue T2) and poison messages that crash workers (T10).

``max_deliveries`` counts deliveries that ended unsettled (crashes, lost
leases), so T10's poison takes the worker down with it each time, in real
subprocesses; handler exceptions are counted by ``retries`` and are covered in
``test_bad_input.py``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

import brokers
from choreo import Event, run
from tests import ledger
from tests.apps.lab import app
from tests.fault_proxy import FaultProxy
from tests.redis_server import RedisServer
from tests.worker_process import WorkerProcess

pytestmark = pytest.mark.anyio

VT = 0.6


class NoRenewal:
    """A broker whose lease renewals never arrive (the renewal loop runs, the broker never hears it)."""

    def __init__(self, inner: brokers.Broker) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def extend_many(self, deliveries: list[brokers.Delivery]) -> list[bool]:
        return [True] * len(deliveries)


@asynccontextmanager
async def two_workers(url: str, effects: ledger.Recorder, *, renew: bool) -> AsyncIterator[Any]:
    """Two runtimes (consumers ``a`` and ``b``) of the lab app."""
    shared = brokers.from_url(url)
    await shared.connect()
    async with AsyncExitStack() as stack:
        stack.push_async_callback(shared.close)
        runtimes = []
        for name in ("a", "b"):
            own = shared if url.startswith("memory") else brokers.from_url(url)
            if own is not shared:
                stack.push_async_callback(own.close)
            broker = own if renew else NoRenewal(own)
            running = run(app, broker=broker, consumer=name, middleware=[effects], grace=3)  # type: ignore[arg-type]
            runtimes.append(await stack.enter_async_context(running))
        yield runtimes


async def until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("renew", [True, False], ids=["renewed", "not-renewed"])
async def test_handler_slower_than_the_lease(
    broker_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, renew: bool
) -> None:
    """T2: a 3x-lease handler keeps its delivery while its lease is renewed (one execution); without
    renewal the delivery is reclaimed, the stale owner's commit is refused, and the effect lands once."""
    url = broker_url + ("&" if "?" in broker_url else "?") + f"visibility_timeout={VT}&claim_interval=0.1"
    runs, marker = tmp_path / "runs", tmp_path / "slow-once"
    effects = ledger.Recorder()
    with caplog.at_level(logging.WARNING, logger="choreo.dispatcher"):
        async with two_workers(url, effects, renew=renew) as runtimes:
            data = {"job": "slow", "seconds": 3 * VT, "ledger": str(runs), "slow_once": str(marker)}
            await runtimes[0].publish("lab.job", data)
            await until(lambda: effects.counts["slow"] == 1, 10, "the job never took effect")
            # Every execution has finished and tried its commit once no handler is running.
            await until(lambda: not any(r.in_flight for r in runtimes), 10, "handlers still running")
    lost = [r for r in caplog.records if "was lost" in r.getMessage()]
    assert effects.counts == Counter({"slow": 1})
    if renew:
        assert ledger.executions(runs) == Counter({"slow": 1})
        assert not lost
    else:
        assert ledger.executions(runs) == Counter({"slow": 2})
        assert len(lost) == 1  # the stale owner's commit, refused



async def test_many_slow_handlers_keep_their_leases(
    broker_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """T2 at scale: 150 handlers, each running 3x the lease, on two workers, keep their deliveries
    (renewed together each round): every job runs once, takes effect once, no commit is refused."""
    url = broker_url + ("&" if "?" in broker_url else "?") + f"visibility_timeout={VT}&claim_interval=0.1"
    runs, jobs = tmp_path / "runs", [f"j{n}" for n in range(150)]
    effects = ledger.Recorder()
    with caplog.at_level(logging.INFO, logger="choreo"):
        async with two_workers(url, effects, renew=True) as runtimes:
            events = [Event(type="lab.job", data={"job": job, "seconds": 3 * VT, "ledger": str(runs)}) for job in jobs]
            await runtimes[0].commit([(event, None) for event in events])
            await until(lambda: sum(effects.counts.values()) >= len(jobs), 20, "jobs never took effect")
            await until(lambda: not any(r.in_flight for r in runtimes), 10, "handlers still running")
    assert effects.counts == Counter(dict.fromkeys(jobs, 1))
    assert ledger.executions(runs) == Counter(dict.fromkeys(jobs, 1))
    complaints = [r.getMessage() for r in caplog.records
                  if r.name.startswith("choreo") and ("lost" in r.getMessage() or "renew" in r.getMessage())]
    assert complaints == []


@pytest.mark.redis
async def test_renewal_round_of_many_leases_is_not_stretched_by_latency(server: RedisServer, tmp_path: Path) -> None:
    """100 slow handlers behind a 10 ms link (each way): one renewal round is one round trip, not
    one per delivery (100 of those, 2 s, twice the lease), so a consumer reading Redis directly
    reclaims none of them, and each job runs once."""
    lease = 1.0
    options = f"visibility_timeout={lease}&claim_interval=0.25"
    proxy = FaultProxy(server.port).start()
    runs, jobs = tmp_path / "runs", [f"j{n}" for n in range(100)]
    effects = ledger.Recorder()
    thief = brokers.from_url(f"{server.url}?{options}")
    await thief.connect()
    try:
        async with run(app, broker=f"redis://127.0.0.1:{proxy.port}/0?{options}", middleware=[effects]) as runtime:
            proxy.latency = 0.01
            events = [Event(type="lab.job", data={"job": job, "seconds": 3 * lease, "ledger": str(runs)})
                      for job in jobs]
            await runtime.commit([(event, None) for event in events])
            await until(lambda: runtime.in_flight == len(jobs), 10, "the worker never held every job")
            stolen: list[brokers.Delivery] = []
            while runtime.in_flight:
                stolen += await thief.fetch("thief", [brokers.Subscription("lab.job", "lab.work")], limit=100,
                                            timeout=0.1)
            assert stolen == []
            await until(lambda: sum(effects.counts.values()) >= len(jobs), 10, "jobs never took effect")
    finally:
        await thief.close()
        proxy.stop()
    assert effects.counts == Counter(dict.fromkeys(jobs, 1))
    assert ledger.executions(runs) == Counter(dict.fromkeys(jobs, 1))


@pytest.mark.redis
async def test_poison_that_crashes_its_worker_is_dead_lettered_after_max_deliveries(
    server: RedisServer, tmp_path: Path
) -> None:
    """T10: a job that SIGKILLs whichever worker takes it (0.3 s in) is handed out exactly
    max_deliveries times, then dead-lettered; jobs published all along keep flowing and each takes
    effect once; crashed workers are restarted."""
    url = f"{server.url}?visibility_timeout=1&claim_interval=0.25&max_deliveries=3"
    runs = tmp_path / "runs"
    workers = [WorkerProcess("tests.apps.lab:app", "--broker", url).start() for _ in range(2)]
    good: list[str] = []
    restarts = 0
    try:
        async with run(broker=url) as producer:
            poison = Event(type="lab.job", data={"job": "poison", "crash": True, "seconds": 0.3, "ledger": str(runs)})
            await producer.commit([(poison, None)])
            deadline = time.monotonic() + 45
            dead: list[brokers.DeadLetterRecord] = []
            while not dead:
                assert time.monotonic() < deadline, (restarts, ledger.executions(runs))
                batch = [Event(type="lab.job", data={"job": f"g{len(good) + i}"}) for i in range(5)]
                await producer.commit([(e, None) for e in batch])
                good += [e.data["job"] for e in batch]
                for i, worker in enumerate(workers):
                    assert worker.process is not None
                    if worker.process.poll() is not None:
                        worker.kill()
                        workers[i] = WorkerProcess("tests.apps.lab:app", "--broker", url).start()
                        restarts += 1
                dead = await producer.broker.dead_letters()
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.5)  # one more lease: nothing else may be handed out
            (record,) = await producer.broker.dead_letters()
            assert (record.message_id, record.reason, record.deliveries) == (poison.id, "max deliveries exceeded", 3)
            assert ledger.executions(runs) == Counter({"poison": 3})
            report = ledger.check(good, ledger.effects_in_redis(url))
            assert report.ok, report
            (backlog,) = await producer.broker.backlog([brokers.Subscription("lab.job", "lab.work")])
            assert backlog.idle
            print(f"T10: {len(good)} good jobs flowed through {restarts} worker restarts")
    finally:
        for worker in workers:
            worker.kill()
