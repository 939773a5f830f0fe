"""Redis-side faults with workers running: CLIENT PAUSE (T6), retention against
pending entries (T13) and vanished consumer groups (T14).

The ledger (``tests.ledger``) is the oracle in each: every acknowledged job
takes effect once.
"""

from __future__ import annotations

import asyncio

import pytest

from choreo import Event
from choreo.testing import run_apps
from tests import ledger
from tests.apps.lab import app
from tests.redis_server import RedisServer, free_port
from tests.test_network_faults import Producer, drained
from tests.worker_process import WorkerProcess, sample, scrape, wait_until

pytestmark = pytest.mark.anyio

OPTIONS = "visibility_timeout=1&claim_interval=0.25&max_deliveries=20"



def jobs(prefix: str, n: int, **data: object) -> list[Event]:
    return [Event(type="lab.job", data={"job": f"{prefix}{i}", **data}) for i in range(n)]


@pytest.mark.redis
async def test_client_pause_loses_nothing_and_catches_up_quietly(server: RedisServer) -> None:
    """T6: CLIENT PAUSE 3 s under load: 0 missing, 0 double; the backlog is worked off within 5 s of
    the pause ending; the worker logs at most a couple of lines about it."""
    url = f"{server.url}?{OPTIONS}"
    worker = WorkerProcess("tests.apps.lab:app", "--broker", url).start()
    try:
        async with run_apps(broker=url) as env:
            async with Producer(env) as producer:
                await asyncio.sleep(1.0)
                before = len(worker.lines)
                server.command("CLIENT", "PAUSE", "3000", "ALL")
                await asyncio.sleep(3.0)
                await asyncio.sleep(0.5)
            caught_up = await drained(url, producer.jobs, timeout=5.0)
            report = ledger.check(producer.jobs, ledger.effects_in_redis(url))
            assert report.ok, report
        print(f"T6: {len(producer.jobs)} jobs; caught up {0.5 + caught_up:.2f}s after the pause ended")
        assert len(worker.lines) - before <= 2, worker.output
    finally:
        worker.kill()


async def test_retention_never_drops_a_pending_entry_under_load(broker_url: str) -> None:
    """T13: maxlen=20 while a job is held pending and 300 more flow past it: trimming keeps the
    pending entry, and every job (the held one too) takes effect once."""
    url = broker_url + ("&" if "?" in broker_url else "?") + "maxlen=20"
    if url.startswith("redis"):
        ledger.keep_effects(url)
    async with run_apps(app, broker=url) as env:
        early = jobs("early", 50)
        await env.runtime.commit([(e, None) for e in early])
        await env.settle(timeout=10)
        (held,) = jobs("held", 1, seconds=1.5)
        await env.runtime.commit([(held, None)])
        await asyncio.sleep(0.2)  # the held job is now pending with the worker
        flow = jobs("flow", 300)
        for start in range(0, 300, 50):
            await env.runtime.commit([(e, None) for e in flow[start:start + 50]])
        if url.startswith("redis://"):
            # One stream to count on (on a cluster each of 16 partitions keeps
            # its own ``maxlen``, and 50 early jobs never fill one).
            from redis import Redis

            while ledger.effects_in_redis(url)["flow299"] == 0:
                await asyncio.sleep(0.05)
            assert await env.broker.trim() >= 30  # type: ignore[attr-defined]  # early jobs go ...
            client = Redis.from_url(broker_url)
            ids = [e[1][b"id"].decode() for e in client.xrange("choreo:lab.job")]
            client.close()
            assert ids[0] == held.id  # ... the pending one and everything after it stay
        await env.settle(timeout=10)
        effects = ledger.effects_in_redis(url) if url.startswith("redis") else ledger.effects_in_events(env.published())
        report = ledger.check([e.data["job"] for e in [*early, held, *flow]], effects)
    assert report.ok, report


@pytest.mark.redis
@pytest.mark.parametrize(
    "wipe",
    [("DEL", "choreo:lab.job"), ("XGROUP", "DESTROY", "choreo:lab.job", "lab.work"), ("FLUSHALL",)],
    ids=["stream-deleted", "group-destroyed", "flushall"],
)
async def test_vanished_group_is_recreated_with_bounded_logging_and_a_metric(
    server: RedisServer, wipe: tuple[str, ...]
) -> None:
    """T14: NOGROUP after the stream is deleted, the group destroyed or FLUSHALL: the worker recreates
    the group, logs it once, counts it in choreo_consumer_groups_recreated_total, and jobs published
    afterwards take effect once."""
    url = f"{server.url}?{OPTIONS}"
    port = free_port()
    worker = WorkerProcess(
        "tests.apps.lab:app", "--broker", url, "--metrics-port", str(port), "--health-interval", "0.2"
    ).start()
    try:
        async with run_apps(broker=url) as env:
            before = jobs("before", 20)
            await env.runtime.commit([(e, None) for e in before])
            await drained(url, [e.data["job"] for e in before], timeout=10)
            server.command(*wipe)
            wait_until(lambda: sample(scrape(port), "choreo_consumer_groups_recreated_total") >= 1, 10,
                       "the recreated groups metric")
            after = jobs("after", 20)
            await env.runtime.commit([(e, None) for e in after])
            await drained(url, [e.data["job"] for e in after], timeout=10)
            effects = ledger.effects_in_redis(url)
            assert all(effects[e.data["job"]] == 1 for e in after), effects
            if wipe[0] == "XGROUP":  # the effects of the earlier jobs are still there, once each
                assert all(effects[e.data["job"]] == 1 for e in before), effects
            await asyncio.sleep(1.0)  # a few more empty fetches: no further log lines
        warnings = [line for line in worker.lines if "consumer groups were missing" in line]
        assert len(warnings) == 1, worker.output
        assert sample(scrape(port), "choreo_consumer_groups_recreated_total") >= 1
    finally:
        worker.kill()

