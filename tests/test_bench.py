"""The benchmark scripts README.md names still run and report their ratios
(tiny sizes: this checks that they work, not how fast anything is)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def bench(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, f"bench/{script}", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_memory_chain_reports_the_production_path_and_the_harness_against_its_baseline() -> None:
    out = bench("chain_memory.py", "--events", "200", "--repeat", "2")
    assert "production path (choreo.run):" in out
    assert "test harness (run_apps):" in out
    assert "of the baseline" in out


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="needs valgrind")
def test_chain_instructions_reports_each_contender_against_the_baseline() -> None:
    out = bench("chain_instructions.py", "--chains", "40", "--less", "20")
    for name in ("baseline asyncio.Queue + json:", "production path (choreo.run):", "test harness (run_apps):"):
        assert name in out
    assert "instructions per event" in out and "x the baseline" in out


@pytest.mark.redis
def test_redis_chain_reports_throughput_and_latency_ratios() -> None:
    out = bench("chain_redis.py", "--events", "200", "--latency-events", "20", "--repeat", "2")
    assert "throughput ratio choreo/raw:" in out
    assert "latency ratio p50 choreo/raw:" in out
    assert "per round" in out
    assert "process CPU per handled event" in out


@pytest.mark.redis
def test_redis_chain_reports_the_cost_of_tracing_at_each_sampling_ratio() -> None:
    out = bench("chain_redis.py", "--events", "200", "--latency-events", "10", "--repeat", "2", "--otel",
                "--otel-ratios", "0.5")
    assert "traced cost per handled event" in out and "traced 0.5 cost per handled event" in out
    assert "CPU cost per round" in out


@pytest.mark.redis
def test_saga_throughput_runs_on_both_brokers() -> None:
    out = bench("saga_throughput.py", "--sagas", "20", "--concurrency", "5")
    assert "memory" in out and "redis" in out
    assert "parallel" in out and "sequential" in out and "Redis commands/saga" in out and "CPU" in out


def test_saga_throughput_compares_postgres_state_with_broker_state() -> None:
    out = bench("saga_throughput.py", "--sagas", "20", "--concurrency", "5", "--broker", "memory",
                "--shape", "sequential", "--state", "postgres")
    assert "state=broker" in out and "state=postgres" in out and "PostgreSQL transactions/step" in out


@pytest.mark.redis
def test_publisher_benchmark_reports_round_trips_and_the_ratio() -> None:
    out = bench("publish_redis.py", "--publishes", "500", "--concurrency", "20", "--repeat", "2")
    assert "time ratio choreo/raw:" in out
    assert "round trips/publish" in out and "per round" in out


@pytest.mark.redis
def test_worker_process_benchmark_reports_per_round_figures_and_the_ratio() -> None:
    out = bench("worker_process.py", "--chains", "300", "--repeat", "1")
    assert "round 1: raw" in out and "round 1: choreo" in out
    assert "ratio choreo/raw (medians):" in out


@pytest.mark.redis
def test_dashboard_pages_benchmark_reports_server_time_against_its_baseline() -> None:
    out = bench("dashboard_pages.py", "--sagas", "300", "--requests", "2")
    assert "redis: baseline, list_state" in out and "redis: /sagas " in out and "p50" in out


@pytest.mark.redis
def test_dashboard_pages_benchmark_compares_postgres_state_with_redis_state() -> None:
    out = bench("dashboard_pages.py", "--sagas", "300", "--requests", "2", "--state", "postgres", "--explain")
    for page in ("/sagas ", "/sagas?state=failed&name=trip ", "/api/sagas?limit=500 "):
        assert f"redis: {page}" in out and f"postgres: {page}" in out
    assert "PostgreSQL CPU" in out and "Execution Time" in out


def test_tracing_cost_benchmark_reports_each_sampling_ratio_against_untraced() -> None:
    out = bench("tracing_cost.py", "--chains", "200", "--repeat", "2")
    for mode in ("sdk", "always", "0.1", "0.01"):
        assert f"{mode} " in out and "cost +" in out
    assert "untraced  CPU per handled event" in out and "per round:" in out


def test_cluster_scaling_benchmark_reports_every_setup() -> None:
    out = bench("cluster_scaling.py", "--chains", "100")
    for setup in ("redis, 1 worker process", "redis, 2 worker processes", "cluster 1 master, 1 worker process",
                  "cluster 3 masters, 1 worker process", "cluster 3 masters, 2 worker processes"):
        assert f"round 1: {setup}" in out, out


def test_redis_instructions_benchmark_counts_both_sides() -> None:
    out = bench("redis_instructions.py", "--chains", "50", "--warmup", "20", "--top", "3")
    assert "raw " in out and "choreo " in out and "k per chain" in out
    assert "choreo/raw:" in out


@pytest.mark.redis
def test_peers_run_the_chain_beside_choreo_and_the_raw_loop() -> None:
    # The first run installs the peers' pinned releases into bench/.peers/.
    out = bench("peers.py", "--chains", "30", "--repeat", "1")
    assert "faststream 0.7.8" in out and "dramatiq 2.2.1" in out and "taskiq 0.13.0" in out
    for name in ("raw", "choreo", "faststream", "dramatiq", "taskiq"):
        assert f"median  {name}" in out
    assert "x raw events/s" in out and "raw worker CPU" in out


@pytest.mark.redis
def test_lease_renewal_reports_both_ways_directly_and_behind_latency() -> None:
    out = bench("lease_renewal.py", "--leases", "20", "--repeat", "2")
    assert "direct, 20 leases:" in out and "behind 1 ms each way, 20 leases:" in out
    assert out.count("one by one: median") == 2 and out.count("extend_many: median") == 2
    assert "1 EVALSHA calls a round" in out
