"""TLS and ACL (catalogue T17): certificates are verified (on one Redis and on
a Redis Cluster that speaks TLS between its nodes too), a worker's ACL user
can do its job and nothing else, no secret reaches a log or a scrape, and the
metrics endpoint listens on 127.0.0.1 only.

Certificates come from a throwaway CA made with the ``openssl`` CLI.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.exceptions import NoPermissionError

from choreo import App, Event
from choreo.errors import BrokerUnavailable
from choreo.testing import run_apps
from tests import ledger
from tests.apps.lab import app
from tests.redis_cluster import RedisCluster
from tests.redis_server import RedisServer, free_port
from tests.test_network_faults import drained
from tests.worker_process import WorkerProcess, scrape

OPERATIONS = Path(__file__).resolve().parent.parent / "docs" / "operations.md"

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

OPENSSL = shutil.which("openssl")


def openssl(*args: str, cwd: Path) -> None:
    assert OPENSSL is not None
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(where: Path, name: str) -> None:
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.crt", cwd=where)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if OPENSSL is None:
        pytest.skip("the openssl CLI is not installed: cannot make a test CA")
    where = tmp_path_factory.mktemp("tls")
    make_ca(where, "choreo-test-ca")
    make_ca(where, "rogue-ca")
    (where / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", "server.key",
            "-out", "server.csr", cwd=where)
    openssl("x509", "-req", "-in", "server.csr", "-CA", "choreo-test-ca.crt", "-CAkey", "choreo-test-ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", "san.cnf", "-out", "server.crt", cwd=where)
    return where


@pytest.fixture
def tls_server(certificates: Path, start_redis: Callable[..., RedisServer]) -> tuple[RedisServer, int]:
    tls_port = free_port()
    instance = start_redis(appendonly=True, extra=(
        "--tls-port", str(tls_port), "--tls-cert-file", str(certificates / "server.crt"),
        "--tls-key-file", str(certificates / "server.key"),
        "--tls-ca-cert-file", str(certificates / "choreo-test-ca.crt"), "--tls-auth-clients", "no",
    ))
    return instance, tls_port


async def test_tls_with_the_trusted_ca_works_and_an_untrusted_one_is_refused(
    tls_server: tuple[RedisServer, int], certificates: Path
) -> None:
    """rediss:// verifies the server certificate: the test CA works end to end; the system store and
    a rogue CA are refused at connect, with a clear error."""
    _, port = tls_server
    trusted = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={certificates / 'choreo-test-ca.crt'}"
    async with run_apps(app, broker=trusted) as env:
        event = await env.publish("lab.job", {"job": "tls"})
        await env.settle(timeout=10)
        assert [e.causation_id for e in env.published("lab.done")] == [event.id]
    rogue = certificates / "rogue-ca.crt"
    for untrusted in (f"rediss://127.0.0.1:{port}/0", f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={rogue}"):
        with pytest.raises(BrokerUnavailable, match=r"(?i)certificate verify failed"):
            async with run_apps(app, broker=untrusted):
                pass


chain = App("tls_chain")


@chain.on_event("tls.placed")
@chain.emits("tls.confirmed")
async def confirm(data: dict[str, Any]) -> dict[str, Any]:
    return {**data, "hops": 1}


@chain.on_event("tls.confirmed")
@chain.emits("tls.paid")
async def pay(data: dict[str, Any]) -> dict[str, Any]:
    return {**data, "hops": 2}


@chain.on_event("tls.paid")
@chain.emits("tls.shipped")
async def ship(data: dict[str, Any]) -> dict[str, Any]:
    return {**data, "hops": 3}


@pytest.fixture
def tls_cluster(certificates: Path) -> Iterator[RedisCluster]:
    """3 masters and 3 replicas that talk TLS to clients, to each other and to their replicas."""
    shutil.copy(certificates / "choreo-test-ca.crt", certificates / "ca.crt")
    instance = RedisCluster(appendonly=False, tls=certificates)
    try:
        instance.start()
        yield instance
    finally:
        instance.stop()


async def test_rediss_cluster_verifies_certificates_end_to_end(tls_cluster: RedisCluster, certificates: Path) -> None:
    """rediss+cluster:// takes the TLS options of rediss:// (``ssl_ca_certs``): a 3-hop chain
    round-trips over TLS with the certificates verified; the system store and a rogue CA are
    refused at connect, with a clear error."""
    trusted = f"{tls_cluster.url}?ssl_ca_certs={certificates / 'choreo-test-ca.crt'}"
    assert trusted.startswith("rediss+cluster://")
    async with run_apps(chain, broker=trusted) as env:
        placed = await env.publish("tls.placed", {"order": "o-1"})
        await env.settle(timeout=20)
        (shipped,) = env.published("tls.shipped")
        assert shipped.data == {"order": "o-1", "hops": 3}
        assert shipped.correlation_id == placed.correlation_id
    rogue = certificates / "rogue-ca.crt"
    for untrusted in (tls_cluster.url, f"{tls_cluster.url}?ssl_ca_certs={rogue}"):
        with pytest.raises(BrokerUnavailable, match=r"(?i)certificate verify failed"):
            async with run_apps(chain, broker=untrusted):
                pass


ACL_RULES = (
    "on >w0rker-s3cret resetkeys ~choreo:* resetchannels -@all +ping +hello +evalsha +eval"
    " +script|load +multi +exec +time +del +hget +hset +hmget +hdel +hlen +pexpire +zadd +zrem +zrange +zrangebyscore"
    " +zrangebylex +xadd +xack +xautoclaim +xclaim +xdel +xgroup|create +xinfo|groups +xlen +xpending +xrange"
    " +xrevrange +xread +xreadgroup +xtrim"
)


def listening_addresses(pid: int, port: int) -> set[str]:
    """Local addresses ``pid`` listens on for ``port`` (from /proc/<pid>/net/tcp{,6})."""
    found = set()
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


@pytest.fixture
def acl_server(server: RedisServer) -> RedisServer:
    server.command("ACL", "SETUSER", "worker", *ACL_RULES.split())
    return server


async def test_worker_acl_user_works_cannot_overreach_and_leaks_no_secret(acl_server: RedisServer) -> None:
    """A worker on the documented least-privilege user applies every job once; that user cannot
    FLUSHALL, CONFIG or touch keys outside choreo:*; the password is in no log line and no scrape;
    the metrics endpoint listens on 127.0.0.1 only."""
    secret = "w0rker-s3cret"
    url = f"redis://worker:{secret}@127.0.0.1:{acl_server.port}/0?visibility_timeout=1"
    port = free_port()
    worker = WorkerProcess("tests.apps.lab:app", "--broker", url, "--metrics-port", str(port),
                           "--health-interval", "0.2").start()
    try:
        assert worker.process is not None
        assert listening_addresses(worker.process.pid, port) == {"0100007F"}  # 127.0.0.1, little-endian hex
        async with run_apps(broker=url) as env:
            events = [Event(type="lab.job", data={"job": f"a{i}"}) for i in range(20)]
            await env.runtime.commit([(e, None) for e in events])
            await drained(acl_server.url, [e.data["job"] for e in events], timeout=10)
        assert ledger.check([e.data["job"] for e in events], ledger.effects_in_redis(acl_server.url)).ok
        client = redis.Redis.from_url(url.split("?")[0])
        try:
            for denied in (("FLUSHALL",), ("CONFIG", "SET", "appendonly", "no"), ("SET", "other:key", "1"),
                           ("GET", "session:1"), ("KEYS", "*")):
                with pytest.raises(NoPermissionError):
                    client.execute_command(*denied)
        finally:
            client.close()
        metrics = scrape(port)
        worker.terminate()
        assert secret not in worker.output and secret not in metrics
        assert "worker:***@" in worker.output  # the URL is logged, redacted
    finally:
        worker.kill()


TRACE_RULES = (
    "on >r3ader-s3cret resetkeys %R~choreo:* resetchannels -@all +ping +hello +scan +xrange +xinfo|groups"
    " +xpending +xlen +zrange +time +multi +exec"
)


def trace(url: str, correlation_id: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "choreo", "trace", correlation_id, "--broker", url],
        capture_output=True, text=True, timeout=60, check=False,
    )


async def test_trace_says_in_one_line_what_a_user_may_not_run_and_works_read_only(acl_server: RedisServer) -> None:
    """`choreo trace` with the worker's user (no SCAN) fails in one line naming the command;
    with the read-only user docs/operations.md gives, it rebuilds a transaction."""
    worker_url = f"redis://worker:w0rker-s3cret@127.0.0.1:{acl_server.port}/0"
    async with run_apps(app, broker=worker_url) as env:
        event = await env.publish("lab.job", {"job": "t1"})
        await env.settle()
    denied = trace(worker_url, event.correlation_id)
    lines = denied.stderr.strip().splitlines()
    assert denied.returncode == 1 and len(lines) == 1 and "Traceback" not in denied.stderr, denied.stderr
    assert "no permissions to run the 'scan' command" in lines[0] and "w0rker-s3cret" not in lines[0]

    acl_server.command("ACL", "SETUSER", "reader", *TRACE_RULES.split())
    allowed = trace(f"redis://reader:r3ader-s3cret@127.0.0.1:{acl_server.port}/0", event.correlation_id)
    assert allowed.returncode == 0, allowed.stderr
    assert "lab.job" in allowed.stdout
    assert "+scan +xrange +xinfo\\|groups +xpending +xlen +zrange +time" in OPERATIONS.read_text()
