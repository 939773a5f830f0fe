"""A private PostgreSQL cluster for tests: initdb into a temp dir, started on a
free port, and restartable and killable, so tests can fault the real thing.

Debian installs the server binaries under /usr/lib/postgresql/<major>/bin
(``apt-get install postgresql``; scripts/test.sh does it when missing). The
server refuses to run as root, so as root it runs as the ``postgres`` user
that package creates. fsync is off: the clusters are thrown away, and a crash
of the server process (what the tests do) loses nothing without it (the
written WAL is in the OS's cache); only a crash of the machine would.
``synchronous_commit`` stays on: with it off, a commit is acknowledged before
its WAL is written, and kill -9 of the server loses it (seen in the restart
test: acknowledged rows missing).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from tests.redis_server import free_port


def server_binaries() -> Path:
    """The newest installed PostgreSQL server's bin directory.

    Raises:
        RuntimeError: no server is installed.
    """
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb is None:
        raise RuntimeError("PostgreSQL server binaries not found (apt-get install postgresql)")
    return Path(initdb).parent


def _run_as() -> str | None:
    """The user to run the server as: ``postgres`` when we are root."""
    return "postgres" if os.geteuid() == 0 else None


class PostgresServer:
    """One PostgreSQL cluster that this test session owns (superuser ``postgres``, trust)."""

    def __init__(self) -> None:
        self.bin = server_binaries()
        self.user = _run_as()
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="choreo-pg-"))
        self.data = self.dir / "data"
        if self.user is not None:
            shutil.chown(self.dir, self.user)
        subprocess.run(
            [str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
             "--no-sync", "--no-instructions"],
            check=True, capture_output=True, user=self.user, timeout=120,
        )
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, database: str = "postgres", user: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        """Start the server (again, after ``stop`` or ``kill``) and wait until it accepts connections."""
        log = open(self.dir / "server.log", "ab")  # noqa: SIM115 - the child keeps it
        self.process = subprocess.Popen(
            [str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port),
             "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.dir}",
             "-c", "fsync=off", "-c", "full_page_writes=off",
             "-c", "max_connections=200", "-c", "shared_buffers=32MB"],
            stdout=log, stderr=log, user=self.user, start_new_session=True,
        )
        log.close()
        self.wait_ready()

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                tail = (self.dir / "server.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"postgres exited with {self.process.returncode}: {tail}")
            ready = subprocess.run(
                [str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"],
                capture_output=True,
            )
            if ready.returncode == 0:
                return
            time.sleep(0.05)
        raise RuntimeError(f"postgres on port {self.port} did not become ready")

    def stop(self) -> None:
        """A fast shutdown (SIGINT): sessions are ended, nothing committed is lost."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            self.process.wait(timeout=30)
        self.process = None

    def kill(self) -> None:
        """kill -9 the server and all its backends: a crash."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def sql(self, statement: str, database: str = "postgres") -> str:
        """Run ``statement`` with psql as the superuser; its output, unaligned."""
        out = subprocess.run(
            [str(self.bin / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", database,
             "-v", "ON_ERROR_STOP=1", "-Atc", statement],
            check=True, capture_output=True, text=True, timeout=60,
        )
        return out.stdout

    def create_database(self, prefix: str = "choreo_test") -> str:
        """A new empty database; its URL."""
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        self.sql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
