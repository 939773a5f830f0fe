"""Faults with real ``choreo worker`` processes on private redis-servers.

Each test starts its own redis-server and its own workers (``tests.apps.ledger``),
faults one of them (SIGKILL or SIGTERM of a worker; SIGKILL, restart or
SIGSTOP of Redis; raw malformed entries) and then checks with an oracle
outside the system under test:

* the ledger file: ``start``/``effect`` lines per execution, by event id and pid
  (at least once: a worker killed after its effect but before its commit runs
  the handler again elsewhere);
* the follow-on stream ``choreo:fault.done`` read with XRANGE: the committed
  effects, which must exist exactly once per job (counted by causation id);
* "drained": the group has no pending entries and has delivered up to the
  stream's last entry (XINFO lag can be stale after a restart).

Synchronization is by polling with deadlines; fault durations (a Redis that
stays down or frozen for a while) are the only fixed waits. The longer chaos
runs are marked ``slow`` (``pytest -m slow tests/test_redis_faults.py``).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from choreo.errors import BrokerUnavailable
from choreo.events import new_event_id
from choreo.testing import run_apps
from tests.redis_server import RedisServer
from tests.worker_process import WorkerProcess, wait_until

pytestmark = pytest.mark.redis

APP = "tests.apps.ledger:app"
JOB, DONE, GROUP = "fault.job", "fault.done", "ledger.work"


# -- oracles -------------------------------------------------------------------


class Ledger:
    """The handler's ``start``/``effect`` lines, read from outside the workers."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
        starts: dict[str, list[int]] = {}
        effects: dict[str, list[int]] = {}
        text = self.path.read_text() if self.path.exists() else ""
        for line in text.splitlines():
            kind, event_id, pid = line.split()
            (starts if kind == "start" else effects).setdefault(event_id, []).append(int(pid))
        return starts, effects

    @property
    def starts(self) -> dict[str, list[int]]:
        return self.read()[0]

    @property
    def effects(self) -> dict[str, list[int]]:
        return self.read()[1]

    def in_flight(self) -> Counter[int]:
        """Handlers started and not finished, by pid."""
        starts, effects = self.read()
        running: Counter[int] = Counter()
        for event_id, pids in starts.items():
            left = Counter(pids)
            left.subtract(effects.get(event_id, []))
            running.update(+left)
        return running


def follow_ons(server: RedisServer) -> Counter[str]:
    """``fault.done`` entries per causing job id (XRANGE over the whole stream)."""
    client = redis.Redis(port=server.port)
    try:
        entries = client.xrange(f"choreo:{DONE}")
    finally:
        client.close()
    return Counter(json.loads(fields[b"body"])["causation_id"] for _, fields in entries)


def dead_letters(server: RedisServer) -> list[dict[bytes, bytes]]:
    client = redis.Redis(port=server.port)
    try:
        return [fields for _, fields in client.xrange("choreo:_dead")]
    finally:
        client.close()


def drained(server: RedisServer, topic: str = JOB, group: str = GROUP) -> bool:
    """No pending entry and everything delivered, for ``group`` on ``topic``."""
    client = redis.Redis(port=server.port, decode_responses=True)
    try:
        key = f"choreo:{topic}"
        last = client.xrevrange(key, count=1)
        for info in client.xinfo_groups(key):
            if info["name"] == group:
                return info["pending"] == 0 and (not last or info["last-delivered-id"] == last[0][0])
        return False
    finally:
        client.close()


def state_of(server: RedisServer, ledger: Ledger, ids: list[str]) -> str:
    """What a failed wait saw: jobs without follow-on, their ledger lines, pending and dead letters."""
    done = follow_ons(server)
    starts, effects = ledger.read()
    absent = [i for i in ids if done[i] == 0]
    client = redis.Redis(port=server.port, decode_responses=True)
    try:
        pending = client.xpending_range(f"choreo:{JOB}", GROUP, "-", "+", 20)
        dead = client.xrange("choreo:_dead", count=20)
        groups = client.xinfo_groups(f"choreo:{JOB}")
    finally:
        client.close()
    lines = [f"{i}: starts {starts.get(i)} effects {effects.get(i)}" for i in absent[:10]]
    return "\n".join([f"{len(absent)} without follow-on", *lines, f"groups {groups}", f"pending {pending}",
                      f"dead {dead}"])


def check_exactly_once(server: RedisServer, ledger: Ledger, ids: list[str]) -> None:
    """Every job executed (none missing) and committed its follow-on exactly once."""
    effects = ledger.effects
    missing = [i for i in ids if i not in effects]
    done = follow_ons(server)
    absent = [i for i in ids if done[i] == 0]
    doubles = {i: n for i, n in done.items() if n > 1}
    assert (missing, absent, doubles) == ([], [], {})
    assert set(done) == set(ids), "a follow-on for a job that was never published"


def complaints(worker: WorkerProcess) -> list[str]:
    return [line for line in worker.lines if " ERROR " in line or " WARNING " in line or "Traceback" in line]


# -- fixtures --------------------------------------------------------------------


class Fleet:
    """Worker subprocesses of one test; whatever is left is killed at teardown."""

    def __init__(self) -> None:
        self.workers: list[WorkerProcess] = []

    def start(self, url: str, *args: str) -> WorkerProcess:
        worker = WorkerProcess(APP, "--broker", url, *args)
        self.workers.append(worker)
        return worker.start()

    def by_pid(self, pid: int) -> WorkerProcess:
        [worker] = [w for w in self.workers if w.process is not None and w.process.pid == pid]
        return worker

    def alive(self) -> list[WorkerProcess]:
        return [w for w in self.workers if w.process is not None and w.process.poll() is None]

    def kill_all(self) -> None:
        for worker in self.workers:
            worker.kill()


@pytest.fixture
def fleet() -> Iterator[Fleet]:
    workers = Fleet()
    try:
        yield workers
    finally:
        workers.kill_all()




def url_of(server: RedisServer, query: str) -> str:
    return f"{server.url}?{query}"


def publish_jobs(url: str, data: list[dict[str, object]]) -> list[str]:
    """Publish one job per item (from this process); their event ids."""

    async def go() -> list[str]:
        async with run_apps(broker=url) as env:
            return [(await env.publish(JOB, item)).id for item in data]

    return asyncio.run(go())


class Publisher(threading.Thread):
    """Publishes ``count`` jobs in a loop, as a real producer would: a publish
    that fails is retried with the same event id until it is acknowledged.
    ``acked`` lists the ids whose publish returned, in order."""

    def __init__(self, url: str, ledger: Path, count: int, *, pause: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.url, self.ledger, self.count, self.pause = url, ledger, count, pause
        self.acked: list[str] = []
        self.failures = 0
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            asyncio.run(self._publish())
        except BaseException as exc:  # reported by the test
            self.error = exc

    async def _publish(self) -> None:
        async with run_apps(broker=self.url) as env:
            for _ in range(self.count):
                event_id = new_event_id()
                while not self.stop.is_set():
                    try:
                        await env.publish(JOB, {"ledger": str(self.ledger)}, id=event_id)
                    except BrokerUnavailable:
                        self.failures += 1
                        await asyncio.sleep(0.05)
                        continue
                    self.acked.append(event_id)
                    break
                if self.stop.is_set():
                    return
                await asyncio.sleep(self.pause)

    def finish(self, timeout: float) -> None:
        self.join(timeout)
        if self.is_alive():
            self.stop.set()
            self.join(10)
            raise AssertionError(f"publisher did not finish within {timeout}s ({len(self.acked)} acknowledged)")
        if self.error is not None:
            raise self.error


# -- T1: kill -9 of a worker mid-handler ------------------------------------------


def test_kill_9_mid_handler_survivor_finishes_within_visibility_timeout(
    server: RedisServer, fleet: Fleet, tmp_path: Path
) -> None:
    """The worker holding a job is SIGKILLed mid-handler; the other worker of
    the group reclaims it within visibility_timeout plus a claim interval or
    two, and the job's follow-on event exists exactly once."""
    visibility = 1.5
    url = url_of(server, f"visibility_timeout={visibility}")
    ledger, hold = Ledger(tmp_path / "ledger"), tmp_path / "hold"
    hold.touch()
    a, b = fleet.start(url), fleet.start(url)
    [job] = publish_jobs(url, [{"ledger": str(ledger.path), "hold": str(hold)}])
    wait_until(lambda: job in ledger.starts, message="handler started")
    [holder_pid] = ledger.starts[job]
    holder = fleet.by_pid(holder_pid)
    survivor = b if holder is a else a

    holder.kill()
    killed_at = time.monotonic()
    hold.unlink()
    wait_until(lambda: follow_ons(server)[job] >= 1, timeout=visibility + 3, message="follow-on after the kill")
    elapsed = time.monotonic() - killed_at
    wait_until(lambda: drained(server), message="drained")

    assert elapsed < visibility + 2, f"reprocessed {elapsed:.2f}s after the kill"
    assert ledger.effects == {job: [survivor.process.pid]}  # type: ignore[union-attr]
    check_exactly_once(server, ledger, [job])
    assert survivor.process is not None and survivor.process.poll() is None
    assert not [line for line in survivor.lines if "Traceback" in line]


def kill_chaos(server: RedisServer, fleet: Fleet, ledger: Ledger, *, batches: int, per_batch: int) -> None:
    """Two workers; per batch: publish jobs, SIGKILL the worker with the most
    handlers in flight, start a replacement. Then: no job missing, every
    follow-on exactly once, and a job ran twice only if a killed worker had
    started it."""
    # The same jobs are often in flight on the next victim too: keep them off
    # the dead-letter stream (that is max_deliveries doing its job, tested apart).
    url = url_of(server, "visibility_timeout=1&max_deliveries=100")
    args = ("--concurrency", "4")
    fleet.start(url, *args)
    fleet.start(url, *args)
    ids: list[str] = []
    killed: set[int] = set()
    for _ in range(batches):
        ids += publish_jobs(url, [{"ledger": str(ledger.path), "seconds": 0.3}] * per_batch)
        live = {w.process.pid for w in fleet.alive() if w.process is not None}

        def busy_worker(live: set[int] = live) -> int | None:
            running = ledger.in_flight()
            candidates = [(n, pid) for pid, n in running.items() if pid in live]
            return max(candidates)[1] if candidates else None

        wait_until(lambda: busy_worker() is not None, message="a handler in flight")
        victim = busy_worker()
        assert victim is not None
        fleet.by_pid(victim).kill()
        killed.add(victim)
        fleet.start(url, *args)

    deadline = 10 + 0.3 * len(ids) / 4
    try:
        wait_until(lambda: len(follow_ons(server)) >= len(ids), timeout=deadline, message="every follow-on")
    except AssertionError as exc:
        logs = "\n".join(line for w in fleet.alive() for line in complaints(w)[-5:])
        raise AssertionError(f"{exc}\n{state_of(server, ledger, ids)}\nworker logs:\n{logs}") from None
    wait_until(lambda: drained(server), message="drained")
    check_exactly_once(server, ledger, ids)
    assert dead_letters(server) == []
    starts, effects = ledger.read()
    for event_id, pids in effects.items():
        if len(pids) > 1:
            # Ran again only because a killed worker had started it.
            assert set(starts[event_id]) & killed, (event_id, starts[event_id], killed)
    for worker in fleet.alive():
        assert not [line for line in worker.lines if "Traceback" in line], worker.output


def test_workers_killed_repeatedly_lose_nothing_and_emit_nothing_twice(
    server: RedisServer, fleet: Fleet, tmp_path: Path
) -> None:
    """4 kills over 80 jobs."""
    kill_chaos(server, fleet, Ledger(tmp_path / "ledger"), batches=4, per_batch=20)


@pytest.mark.slow
def test_twenty_kills_over_two_hundred_events(server: RedisServer, fleet: Fleet, tmp_path: Path) -> None:
    """T1 at full size: 20 kills over 200 jobs."""
    kill_chaos(server, fleet, Ledger(tmp_path / "ledger"), batches=20, per_batch=10)


# -- T8: producer duplicates in flight together ---------------------------------------------


def test_producer_duplicates_handled_concurrently_emit_once(server: RedisServer, fleet: Fleet, tmp_path: Path) -> None:
    """Every job is XADDed twice with the same event id (what a retried publish
    leaves behind), so two workers often run both copies at once: each job's
    follow-on still exists exactly once."""
    url = url_of(server, "visibility_timeout=2")
    ledger = Ledger(tmp_path / "ledger")
    fleet.start(url)
    fleet.start(url)

    async def publish_twice() -> list[str]:
        async with run_apps(broker=url) as env:
            ids = []
            for _ in range(100):
                event = await env.publish(JOB, {"ledger": str(ledger.path), "seconds": 0.05})
                await env.publish(JOB, {"ledger": str(ledger.path), "seconds": 0.05}, id=event.id)
                ids.append(event.id)
            return ids

    ids = asyncio.run(publish_twice())
    wait_until(lambda: len(follow_ons(server)) >= len(ids), timeout=20, message="every follow-on")
    wait_until(lambda: drained(server), timeout=15, message="drained (leftover copies dropped)")
    check_exactly_once(server, ledger, ids)


# -- T4: Redis kill -9 and restart from the AOF ---------------------------------------


def redis_restarts_under_load(server: RedisServer, fleet: Fleet, tmp_path: Path, *, count: int, kills: int) -> None:
    url = url_of(server, "visibility_timeout=2")
    ledger = Ledger(tmp_path / "ledger")
    workers = [fleet.start(url), fleet.start(url)]
    pids = [w.process.pid for w in workers if w.process is not None]
    publisher = Publisher(url, ledger.path, count)
    publisher.start()
    try:
        for k in range(1, kills + 1):
            # Kill while jobs are being published and handled.
            target = k * count // (kills + 1)
            wait_until(lambda t=target: len(publisher.acked) >= t and len(ledger.effects) > 0,  # type: ignore[misc]
                       timeout=30, message=f"{target} jobs acknowledged")
            server.kill()
            time.sleep(0.5)  # the outage itself
            server.start()
        publisher.finish(timeout=60)
    finally:
        publisher.stop.set()
    assert publisher.failures > 0, "the publisher never saw the outage"
    acked = publisher.acked
    assert len(acked) == count
    wait_until(lambda: len(follow_ons(server)) >= count, timeout=30, message="every follow-on")
    wait_until(lambda: drained(server), message="drained")
    check_exactly_once(server, ledger, acked)
    for worker, pid in zip(workers, pids, strict=True):
        assert worker.process is not None and worker.process.poll() is None, worker.output
        assert worker.process.pid == pid
        assert not [line for line in worker.lines if "NOSCRIPT" in line or "Traceback" in line], worker.output
        # One unavailable/available pair per outage plus a line per interrupted commit or fetch.
        assert len(complaints(worker)) <= 12 * kills, worker.output


def test_redis_killed_and_restarted_from_aof_loses_no_acknowledged_event(
    fsync_server: RedisServer, fleet: Fleet, tmp_path: Path
) -> None:
    """SIGKILL of Redis under load (AOF, appendfsync always): every job whose
    publish returned is handled, follow-ons exactly once, the same worker
    processes resume by themselves without a NOSCRIPT loop or a log storm."""
    redis_restarts_under_load(fsync_server, fleet, tmp_path, count=300, kills=1)


@pytest.mark.slow
def test_redis_killed_three_times_under_load(fsync_server: RedisServer, fleet: Fleet, tmp_path: Path) -> None:
    redis_restarts_under_load(fsync_server, fleet, tmp_path, count=1500, kills=3)


# -- T5: Redis frozen with SIGSTOP --------------------------------------------------------


def redis_frozen_under_load(
    server: RedisServer, fleet: Fleet, tmp_path: Path, *, freeze: float, visibility: float, count: int
) -> tuple[Ledger, list[str]]:
    url = url_of(server, f"visibility_timeout={visibility}")
    ledger = Ledger(tmp_path / "ledger")
    workers = [fleet.start(url), fleet.start(url)]
    publisher = Publisher(url, ledger.path, count, pause=0.01)
    publisher.start()
    try:
        wait_until(lambda: len(publisher.acked) >= count // 3 and len(ledger.effects) > 0, timeout=30,
                   message="load running")
        server.pause()
        try:
            time.sleep(freeze)  # the freeze itself
        finally:
            server.resume()
        resumed = time.monotonic()
        publisher.finish(timeout=60)
    finally:
        publisher.stop.set()
    wait_until(lambda: len(follow_ons(server)) >= count, timeout=30, message="every follow-on")
    wait_until(lambda: drained(server), message="drained")
    recovered = time.monotonic() - resumed
    check_exactly_once(server, ledger, publisher.acked)
    assert len(publisher.acked) == count
    assert recovered < 30
    for worker in workers:
        assert worker.process is not None and worker.process.poll() is None, worker.output
        assert not [line for line in worker.lines if "Traceback" in line], worker.output
        assert len(complaints(worker)) <= 10, worker.output
    return ledger, publisher.acked


def test_redis_frozen_three_seconds_loses_nothing_and_doubles_nothing(
    server: RedisServer, fleet: Fleet, tmp_path: Path
) -> None:
    """SIGSTOP 3 s then SIGCONT under load, with leases longer than the freeze:
    every job runs exactly once and emits exactly once."""
    ledger, _ = redis_frozen_under_load(server, fleet, tmp_path, freeze=3, visibility=10, count=300)
    starts, effects = ledger.read()
    assert {i: p for i, p in effects.items() if len(p) > 1} == {}
    assert {i: p for i, p in starts.items() if len(p) > 1} == {}


@pytest.mark.slow
def test_redis_frozen_longer_than_the_lease(server: RedisServer, fleet: Fleet, tmp_path: Path) -> None:
    """SIGSTOP 12 s with 2 s leases: when Redis resumes, leases have expired and
    entries may be reclaimed while their first owner commits; the fence lets
    exactly one commit through, so follow-ons stay exactly once."""
    redis_frozen_under_load(server, fleet, tmp_path, freeze=12, visibility=2, count=600)


# -- T9: malformed entries straight into the stream ---------------------------------------


def test_malformed_entries_are_dead_lettered_on_first_delivery_and_the_worker_keeps_going(
    server: RedisServer, fleet: Fleet, tmp_path: Path
) -> None:
    ledger = Ledger(tmp_path / "ledger")
    url = url_of(server, "visibility_timeout=2&max_deliveries=3")
    worker = fleet.start(url)
    assert worker.process is not None
    pid = worker.process.pid
    stream = f"choreo:{JOB}"
    good = {"ledger": str(ledger.path)}
    first = publish_jobs(url, [good])
    wait_until(lambda: len(follow_ons(server)) == 1, message="first good job")
    well_formed = {"v": 1, "type": JOB, "id": "x", "data": good}
    corpus = {
        "bad-json": ("id", "bad-json", "body", "{not json"),
        "bad-utf8": ("id", "bad-utf8", "body", "\udcff"),
        "not-an-object": ("id", "not-an-object", "body", "[1, 2]"),
        "wrong-type": ("id", "wrong-type", "body", json.dumps({**well_formed, "type": "other.thing"})),
        "missing-type": ("id", "missing-type", "body", json.dumps({"v": 1, "id": "y", "data": good})),
        "missing-event-id": ("id", "missing-event-id", "body", json.dumps({"v": 1, "type": JOB, "data": good})),
        "nan": ("id", "nan", "body", '{"v": 1, "type": "fault.job", "id": "z", "data": {"x": NaN}}'),
        "no-body": ("id", "no-body", "junk", "x"),
        "no-id": ("body", json.dumps(well_formed)),
    }
    for fields in corpus.values():
        args = [a.encode("utf-8", "surrogateescape") for a in fields]
        client = redis.Redis(port=server.port)
        try:
            client.execute_command("XADD", stream, "*", *args)
        finally:
            client.close()
    # redis-cli too, exactly as an operator would.
    server.command("XADD", stream, "*", "id", "cli-junk", "body", "{{{")
    later = publish_jobs(url, [good] * 5)
    wait_until(lambda: len(follow_ons(server)) == 6, message="good jobs after the malformed ones")
    wait_until(lambda: drained(server), message="drained")

    client = redis.Redis(port=server.port)
    try:
        dead = [{k.decode(): v.decode(errors="replace") for k, v in fields.items()}
                for _, fields in client.xrange("choreo:_dead")]
    finally:
        client.close()
    assert len(dead) == len(corpus) + 1
    for fields in dead:
        assert fields["deliveries"] == "1", fields
        assert fields["topic"] == JOB and fields["group"] == GROUP
    reasons = {fields.get("message_id"): fields["reason"] for fields in dead}
    assert reasons[None] == 'unreadable entry: missing field "id"'
    assert reasons["no-body"] == 'unreadable entry: missing field "body"'
    undecodable = [name for name in corpus if name not in ("no-body", "no-id")] + ["cli-junk"]
    for name in undecodable:
        assert reasons[name].startswith("undecodable message"), (name, reasons[name])
    check_exactly_once(server, ledger, first + later)
    assert worker.process.poll() is None and worker.process.pid == pid
    assert not [line for line in worker.lines if "Traceback" in line], worker.output
    # What the fetch script dead-letters by itself is logged as well, one line each.
    for reason in {fields["reason"] for fields in dead}:
        expected = sum(fields["reason"] == reason for fields in dead)
        assert sum(reason in line for line in worker.lines) == expected, (reason, worker.output)


# -- T3: SIGTERM with handlers in flight ----------------------------------------------------


def test_sigterm_with_fifty_handlers_in_flight_finishes_them_acks_and_exits_zero(
    server: RedisServer, fleet: Fleet, tmp_path: Path
) -> None:
    ledger = Ledger(tmp_path / "ledger")
    url = url_of(server, "visibility_timeout=2")
    worker = fleet.start(url, "--grace", "10")
    ids = publish_jobs(url, [{"ledger": str(ledger.path), "seconds": 1.0}] * 50)
    wait_until(lambda: len(ledger.starts) == 50, message="50 handlers in flight")
    assert ledger.effects == {}
    started = time.monotonic()
    assert worker.terminate(timeout=15) == 0, worker.output
    assert time.monotonic() - started < 10
    assert "draining 50 in-flight handlers" in worker.output
    assert drained(server)
    check_exactly_once(server, ledger, ids)

    # A new worker finds nothing left over and takes new work.
    again = fleet.start(url)
    more = publish_jobs(url, [{"ledger": str(ledger.path)}] * 5)
    wait_until(lambda: len(follow_ons(server)) == 55, message="new work after the restart")
    wait_until(lambda: drained(server), message="drained")
    check_exactly_once(server, ledger, ids + more)
    assert all(len(p) == 1 for p in ledger.starts.values())
    assert again.terminate() == 0, again.output


def test_sigterm_past_the_grace_period_leaves_the_rest_for_redelivery(
    server: RedisServer, fleet: Fleet, tmp_path: Path
) -> None:
    """Handlers still running when the grace period ends are cancelled without
    an ack; the worker exits with code 3 (cut short, not clean), and a
    restarted worker finishes them."""
    ledger = Ledger(tmp_path / "ledger")
    visibility = 1.0
    url = url_of(server, f"visibility_timeout={visibility}")
    worker = fleet.start(url, "--grace", "0.5")
    quick = publish_jobs(url, [{"ledger": str(ledger.path), "seconds": 0.1}] * 10)
    hold = tmp_path / "hold"
    hold.touch()
    slow = publish_jobs(url, [{"ledger": str(ledger.path), "hold": str(hold)}] * 10)
    wait_until(lambda: set(slow) <= set(ledger.starts), message="slow handlers in flight")
    wait_until(lambda: set(quick) <= set(ledger.effects), message="quick handlers done")
    assert worker.terminate(timeout=15) == 3, worker.output
    assert "cancelling 10 handlers still running" in worker.output
    assert "exiting with code 3: 10 handlers were cancelled past the grace period" in worker.output
    assert not set(slow) & set(ledger.effects)
    hold.unlink()

    fleet.start(url)
    wait_until(lambda: len(follow_ons(server)) == 20, timeout=visibility + 10, message="redelivered after restart")
    wait_until(lambda: drained(server), message="drained")
    check_exactly_once(server, ledger, quick + slow)
