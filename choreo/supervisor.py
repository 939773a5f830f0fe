"""What ``choreo worker`` runs: one worker process, or a parent supervising N.

``run_worker`` sets up logging and metrics around ``choreo.worker.serve`` (which
owns signal handling and draining). ``supervise`` starts N worker processes
(each a fresh interpreter running ``python -m choreo worker``), forwards
SIGTERM/SIGINT to them, serves one aggregated metrics endpoint
(prometheus-client multiprocess mode) and returns 0 once every child drained
and exited 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from types import FrameType
from typing import TYPE_CHECKING

import attrs

from choreo.errors import ConfigurationError
from choreo.options import RuntimeOptions

if TYPE_CHECKING:
    from choreo.lifecycle import Running
    from choreo.metrics import MetricsServer

__all__ = ("CUT_SHORT_EXIT", "WORKER_GC_THRESHOLD", "WorkerOptions", "run_worker", "supervise", "tune_collector")

log = logging.getLogger("choreo.supervisor")

#: Exit code of a child that was misconfigured: restarting it cannot help.
CONFIG_EXIT = 2
#: Exit code of a worker whose drain outlived ``--grace``: it cancelled
#: handlers (their events are redelivered, nothing is lost), so the stop was
#: not clean; a supervisor can act on it (alert, lengthen the stop timeout).
CUT_SHORT_EXIT = 3
#: Seconds between restarts of a crashed child.
RESTART_DELAY = 1.0


#: The collector's first threshold ``choreo worker`` sets (Python's default is 700).
WORKER_GC_THRESHOLD = 10_000


def tune_collector(threshold: int = WORKER_GC_THRESHOLD) -> None:
    """Set up Python's cyclic garbage collector for a worker process, as
    ``choreo worker`` does after loading the apps (``threshold`` 0: leave it).

    Every delivery allocates a few dozen objects in bursts of a fetch, and
    those in flight survive into the older generations, so with Python's
    default threshold the collector runs every few events and keeps sweeping
    the whole heap: a fifth of a worker's CPU on the Redis benchmark. This
    freezes what is loaded so far (modules, apps: full collections skip it)
    and raises the first threshold, so that collections come less often. The
    cost is memory held by garbage in reference cycles until the next
    collection: at most about ``threshold`` objects' worth.
    """
    if threshold <= 0:
        return
    gc.collect()
    gc.freeze()
    _, second, third = gc.get_threshold()
    gc.set_threshold(threshold, second, third)


@attrs.frozen
class WorkerOptions:
    """Everything ``choreo worker`` was asked for.

    Attributes:
        targets: The apps to run, as ``module:attribute``.
        broker: The broker URL (default ``CHOREO_BROKER_URL``, then ``memory://``).
        runtime: How each worker process runs them (concurrency, grace...).
        otel: Tracing is on (``--otel``): ``runtime`` has the tracing
            middleware, and each child of ``--workers N`` is told to add it.
    """

    targets: tuple[str, ...]
    broker: str | None = None
    runtime: RuntimeOptions = attrs.field(factory=RuntimeOptions)
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    log_level: str = "INFO"
    log_format: str = "text"
    health_interval: float = 5.0
    gc_threshold: int = WORKER_GC_THRESHOLD
    otel: bool = False

    def child_argv(self) -> list[str]:
        """The command line of one worker process (metrics are served by the parent)."""
        argv = [sys.executable, "-m", "choreo", "worker", *self.targets,
                "--concurrency", str(self.runtime.concurrency), "--grace", str(self.runtime.grace),
                "--log-level", self.log_level, "--log-format", self.log_format,
                "--health-interval", str(self.health_interval), "--gc-threshold", str(self.gc_threshold)]
        if self.broker:
            argv += ["--broker", self.broker]
        if self.runtime.database:
            argv += ["--database", self.runtime.database]
        if self.otel:
            argv.append("--otel")
        return argv


def _serve_metrics(registry: object, options: WorkerOptions) -> MetricsServer | None:
    from choreo.metrics import start_metrics_server

    if options.metrics_port is None:
        return None
    try:
        server = start_metrics_server(registry, options.metrics_port, options.metrics_host)  # type: ignore[arg-type]
    except OSError as exc:
        raise ConfigurationError(
            f"cannot serve metrics on {options.metrics_host}:{options.metrics_port}: {exc.strerror or exc}"
        ) from None
    log.info("metrics on http://%s:%d/metrics", options.metrics_host, server.port)
    return server


def run_worker(options: WorkerOptions) -> int:
    """Run the apps in this process until SIGTERM/SIGINT, then drain.

    Returns:
        The process's exit code: 0 after a clean drain, ``CUT_SHORT_EXIT``
        when handlers were cancelled past the grace period.

    Raises:
        ConfigurationError: a target cannot be loaded, or the metrics port cannot be bound.
        BrokerUnavailable: the broker cannot be reached.
    """
    from choreo.loader import load_apps
    from choreo.metrics import MULTIPROC_ENV, Metrics
    from choreo.saga.metrics import SagaMetrics
    from choreo.worker import serve

    apps = load_apps(list(options.targets))
    tune_collector(options.gc_threshold)
    # A child of `--workers N` writes to the shared directory; its parent serves the scrape.
    child = bool(os.environ.get(MULTIPROC_ENV))
    metrics = Metrics() if child or options.metrics_port is not None else None
    server = None if metrics is None or child else _serve_metrics(metrics.registry, options)

    runtime = options.runtime
    if metrics is not None:

        @contextlib.asynccontextmanager
        async def watch_health(running: Running) -> AsyncIterator[None]:
            assert metrics is not None
            running.start_task(metrics.watch(running.broker, running.subscriptions, options.health_interval),
                               name="choreo-health")
            yield

        runtime = attrs.evolve(runtime, middleware=(metrics, SagaMetrics(metrics), *runtime.middleware),
                               lifespan=(*runtime.lifespan, watch_health))
    try:
        cancelled = asyncio.run(serve(apps, broker=options.broker, options=runtime))
    finally:
        if server is not None:
            server.close()
    if cancelled:
        log.warning("exiting with code %d: %d handlers were cancelled past the grace period", CUT_SHORT_EXIT,
                    cancelled)
        return CUT_SHORT_EXIT
    return 0


class _Children:
    def __init__(self, argv: Sequence[str], env: dict[str, str], count: int) -> None:
        self.argv = list(argv)
        self.env = env
        self.procs: list[subprocess.Popen[bytes]] = [self._start(i) for i in range(count)]

    def _start(self, index: int) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(self.argv, env={**self.env, "CHOREO_WORKER_INDEX": str(index)})
        log.info("started worker %d (pid %d)", index, proc.pid)
        return proc

    def restart(self, index: int) -> None:
        self.procs[index] = self._start(index)

    def signal_all(self, signum: int) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signum)


def supervise(options: WorkerOptions, count: int) -> int:
    """Run ``count`` worker processes; return the exit code for the parent.

    SIGTERM or SIGINT is forwarded to every child; each drains its in-flight
    handlers and exits. Returns 0 when all exited 0. A child that crashes is
    restarted after a second, unless it exited with the configuration error
    code (then every child is stopped and that code returned).
    """
    from choreo.loader import load_apps
    from choreo.metrics import MULTIPROC_ENV, aggregate_registry

    if count < 1:
        raise ConfigurationError("--workers must be at least 1")
    load_apps(list(options.targets))  # fail fast, in this process, with one clear line
    env = dict(os.environ)
    metrics_dir = None
    server = None
    if options.metrics_port is not None:
        metrics_dir = tempfile.mkdtemp(prefix="choreo-metrics-")
        env[MULTIPROC_ENV] = metrics_dir
        server = _serve_metrics(aggregate_registry(metrics_dir), options)
    stopping: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        stopping.append(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    children = _Children(options.child_argv(), env, count)
    forwarded = False
    code = 0
    finished: set[int] = set()  # pids that exited and were accounted for
    try:
        deadline: float | None = None
        while True:
            if stopping and not forwarded:
                log.info("stopping %d workers (signal %d)", count, stopping[0])
                children.signal_all(signal.SIGTERM)
                forwarded = True
                deadline = time.monotonic() + options.runtime.grace + 10.0
            running = 0
            for index, proc in enumerate(children.procs):
                status = proc.poll()
                if status is None:
                    running += 1
                    continue
                if proc.pid in finished:
                    continue
                finished.add(proc.pid)
                if metrics_dir is not None:
                    _mark_dead(proc.pid, metrics_dir)
                if forwarded:
                    if status != 0 and code == 0:
                        code = status if status > 0 else 1
                    continue
                if status == CONFIG_EXIT:
                    log.error("worker %d exited with a configuration error; stopping", index)
                    stopping.append(signal.SIGTERM)
                    code = CONFIG_EXIT
                    continue
                log.error("worker %d (pid %d) exited with %s; restarting it", index, proc.pid, status)
                time.sleep(RESTART_DELAY)
                children.restart(index)
                running += 1
            if forwarded and running == 0:
                return code
            if deadline is not None and time.monotonic() > deadline:
                log.error("workers still running past the grace period; killing them")
                children.signal_all(signal.SIGKILL)
                code = code or 1
                deadline = None
            time.sleep(0.05)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if server is not None:
            server.close()
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _mark_dead(pid: int, path: str) -> None:
    from prometheus_client import multiprocess

    with contextlib.suppress(OSError):
        multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]

