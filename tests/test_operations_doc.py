"""docs/operations.md against the code: the least-privilege ACL it documents is
the one in ``brokers.redis_streams``, and a real worker process runs with
exactly those permissions."""

from __future__ import annotations

import asyncio
import re
import shlex
from pathlib import Path

import pytest

import brokers.redis_streams
from choreo.testing import run_apps
from tests.redis_server import RedisServer
from tests.test_redis_faults import Fleet, Ledger, check_exactly_once, drained
from tests.worker_process import wait_until

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "operations.md"


def documented_rules() -> list[str]:
    """The ``ACL SETUSER`` rules on the page, as Redis receives them."""
    text = PAGE.read_text()
    match = re.search(r"redis-cli ACL SETUSER (.*?)\+xtrim", text, re.DOTALL)
    assert match is not None, "no ACL SETUSER command in docs/operations.md"
    words = shlex.split(match.group(0).replace("\\\n", " "))
    return words[3:]  # after: redis-cli ACL SETUSER


def module_rules() -> list[str]:
    doc = brokers.redis_streams.__doc__ or ""
    match = re.search(r"ACL SETUSER (.*?\+xtrim)", doc, re.DOTALL)
    assert match is not None
    return match.group(1).split()


def permissions(rules: list[str]) -> list[str]:
    """Rules without the user name and password."""
    return [r for r in rules[1:] if not r.startswith(">")]


def test_page_documents_the_acl_of_the_redis_broker() -> None:
    assert permissions(documented_rules()) == permissions(module_rules())



@pytest.mark.redis
def test_worker_and_publisher_run_as_the_documented_acl_user(server: RedisServer, tmp_path: Path) -> None:
    rules = documented_rules()
    user, password = rules[0], next(r[1:] for r in rules if r.startswith(">"))
    assert server.command("ACL", "SETUSER", *rules).startswith(b"OK")
    url = f"redis://{user}:{password}@127.0.0.1:{server.port}/0?visibility_timeout=2"
    ledger = Ledger(tmp_path / "ledger")
    fleet = Fleet()
    try:
        worker = fleet.start(url)

        async def publish() -> list[str]:
            async with run_apps(broker=url) as env:
                return [(await env.publish("fault.job", {"ledger": str(ledger.path)})).id for _ in range(3)]

        ids = asyncio.run(publish())
        wait_until(lambda: drained(server) and len(ledger.effects) == 3, message="handled as the ACL user")
        check_exactly_once(server, ledger, ids)
        assert worker.terminate() == 0, worker.output
    finally:
        fleet.kill_all()
    assert "NOPERM" not in worker.output and "Traceback" not in worker.output, worker.output
    assert password not in worker.output
