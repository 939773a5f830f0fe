"""``choreo worker`` and ``choreo publish`` as real processes on a real Redis."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import brokers
from brokers import Subscription
from choreo.supervisor import CUT_SHORT_EXIT
from tests.redis_server import RedisServer, free_port
from tests.worker_process import WorkerProcess, choreo, sample, scrape, wait_until

pytestmark = pytest.mark.redis


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    redis_server.command("FLUSHALL")
    return redis_server.url


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def pending(url: str, topic: str, group: str) -> int:
    broker = brokers.from_url(url)
    await broker.connect()
    try:
        [backlog] = await broker.backlog([Subscription(topic, group)])
        return backlog.pending + backlog.ready + backlog.delayed
    finally:
        await broker.close()


def test_worker_handles_published_events_and_metrics_match(redis_url: str, tmp_path: Path) -> None:
    """Events published by `choreo publish` are handled by a worker subprocess,
    and its scraped metrics count exactly what happened."""
    ledger = tmp_path / "ledger"
    port = free_port()
    worker = WorkerProcess(
        "tests.apps.shop:app", "--broker", redis_url, "--metrics-port", str(port), "--health-interval", "0.2"
    ).start()
    try:
        for n in range(3):
            result = choreo("publish", "order.created", f'{{"order_id": "O-{n}", "ledger": "{ledger}"}}',
                            "--broker", redis_url)
            assert result.returncode == 0, result.stderr
            assert "published order.created id=" in result.stdout
        wait_until(lambda: len(lines(ledger)) == 6, message="6 effects")
        expected = [f"accepted O-{n}" for n in range(3)] + [f"notified O-{n}" for n in range(3)]
        assert sorted(lines(ledger)) == sorted(expected)

        def scraped() -> str:
            return scrape(port)

        wait_until(lambda: sample(scraped(), "choreo_events_handled_total", handler="notify") == 3, message="scrape")
        text = scraped()
        assert sample(text, "choreo_events_handled_total", service="shop", handler="accept_order",
                      event="order.created", outcome="success") == 3
        assert sample(text, "choreo_events_published_total", event="order.accepted") == 3
        assert sample(text, "choreo_handler_duration_seconds_count", handler="accept_order") == 3
        assert sample(text, "choreo_events_handled_total", outcome="dead_lettered") == 0
        wait_until(lambda: 'choreo_stream_pending{group="shop.accept_order",stream="order.created"} 0.0' in scraped(),
                   message="health gauges")
        assert sample(scraped(), "choreo_dead_letters") == 0
    finally:
        assert worker.terminate() == 0, worker.output
    assert "Traceback" not in worker.output


def test_sigterm_finishes_the_handler_in_flight_acks_it_and_exits_zero(redis_url: str, tmp_path: Path) -> None:
    """SIGTERM while a handler runs: the handler completes, its delivery is
    acked (nothing pending afterwards), and the worker exits 0."""
    ledger = tmp_path / "ledger"
    worker = WorkerProcess("tests.apps.shop:app", "--broker", redis_url, "--grace", "10").start()
    try:
        result = choreo("publish", "job.slow", f'{{"job_id": "J-1", "seconds": 1.5, "ledger": "{ledger}"}}',
                        "--broker", redis_url)
        assert result.returncode == 0, result.stderr
        wait_until(lambda: "started J-1" in lines(ledger), message="handler started")
    finally:
        code = worker.terminate()
    assert code == 0, worker.output
    assert lines(ledger) == ["started J-1", "finished J-1"]
    assert asyncio.run(pending(redis_url, "job.slow", "shop.slow_job")) == 0
    assert "draining 1 in-flight handlers" in worker.output


def test_several_worker_processes_share_work_drain_on_sigterm_and_one_scrape_sees_all(
    redis_url: str, tmp_path: Path
) -> None:
    """--workers 2: the parent starts two processes, serves one aggregated
    scrape, forwards SIGTERM, and exits 0 once both drained."""
    ledger = tmp_path / "ledger"
    port = free_port()
    worker = WorkerProcess(
        "tests.apps.shop:app", "--broker", redis_url, "--workers", "2", "--metrics-port", str(port)
    ).start(count=2)
    try:
        for n in range(6):
            result = choreo("publish", "order.created", f'{{"order_id": "O-{n}", "ledger": "{ledger}"}}',
                            "--broker", redis_url)
            assert result.returncode == 0, result.stderr
        wait_until(lambda: len(lines(ledger)) == 12, message="12 effects")
        wait_until(lambda: sample(scrape(port), "choreo_events_handled_total", handler="notify") == 6,
                   message="aggregated scrape")
        assert sample(scrape(port), "choreo_events_handled_total", handler="accept_order", outcome="success") == 6
    finally:
        code = worker.terminate()
    assert code == 0, worker.output
    assert worker.output.count("stopping: draining in-flight handlers") == 2


def test_worker_with_a_bad_target_prints_one_line_and_exits_2() -> None:
    result = choreo("worker", "tests.apps.nope:app")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: cannot import 'tests.apps.nope:app'")
    assert "Traceback" not in result.stderr


def test_metrics_port_in_use_is_one_clear_line(redis_url: str) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = choreo("worker", "tests.apps.shop:app", "--broker", redis_url, "--metrics-port", str(port))
    assert result.returncode == 2
    assert f"error: cannot serve metrics on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_sigterm_does_not_wait_for_a_sync_handler_past_the_grace_period(redis_url: str, tmp_path: Path) -> None:
    """A sync handler still blocking its thread after the grace period neither keeps
    the worker alive nor is acked: the worker exits promptly with code 3 (a drain cut
    short, not a clean one), the delivery stays pending."""
    ledger = tmp_path / "ledger"
    worker = WorkerProcess("tests.apps.blocking:app", "--broker", redis_url, "--grace", "0.5").start()
    try:
        result = choreo("publish", "report.requested", f'{{"report_id": "R-1", "seconds": 60, "ledger": "{ledger}"}}',
                        "--broker", redis_url)
        assert result.returncode == 0, result.stderr
        wait_until(lambda: "started R-1" in lines(ledger), message="handler started")
    finally:
        code = worker.terminate(timeout=10)
    assert code == CUT_SHORT_EXIT == 3, worker.output
    assert asyncio.run(pending(redis_url, "report.requested", "reports.build_report")) == 1


@pytest.mark.parametrize(("threshold", "expected"), [(20_000, 20_000), (0, 700)])
def test_worker_sets_up_the_garbage_collector_as_documented(threshold: int, expected: int) -> None:
    """`choreo worker --gc-threshold N` raises the collector's first threshold
    and freezes what was loaded; 0 leaves Python's defaults alone."""
    import subprocess
    import sys

    script = (
        "import gc; from choreo.supervisor import tune_collector; "
        f"tune_collector({threshold}); print(gc.get_threshold()[0], gc.get_freeze_count() > 0)"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(expected), str(threshold > 0)]


def test_worker_children_get_the_collector_setting() -> None:
    """With --workers N, every child process runs with the parent's --gc-threshold."""
    from choreo.supervisor import WorkerOptions

    argv = WorkerOptions(targets=("shop:app",), gc_threshold=1234).child_argv()
    assert argv[argv.index("--gc-threshold") + 1] == "1234"
