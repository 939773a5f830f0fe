"""Deploy order never loses events: where a handler's consumer group starts.

Every test runs on the memory broker, on Redis and on Redis Cluster, with one
broker shared by a publisher and the workers that come after it. ORDER: each
order is a business transaction of its own, and a broker with partitions
keeps the order of events within a transaction only, so the orders handled
are compared as sets.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

import brokers
from brokers import Broker
from choreo import App, ConfigurationError
from choreo.testing import run_apps
from tests.redis_server import RedisServer


def recorder(service: str, event: str = "order.created", **options: Any) -> tuple[App, list[str]]:
    app = App(service)
    seen: list[str] = []

    @app.on_event(event, **options)
    async def take(data: dict[str, Any]) -> None:
        seen.append(data["order"])

    return app, seen


async def publish(broker: Broker, *orders: str) -> None:
    async with run_apps(broker=broker) as env:
        for order in orders:
            await env.publish("order.created", {"order": order})


async def test_events_published_before_the_first_workers_reach_every_handler_of_the_first_deploy(
    broker: Broker,
) -> None:
    """Deploy the publisher, then the workers: the first events are delivered to every handler."""
    await publish(broker, "O-1", "O-2")
    billing, billed = recorder("billing")
    stock, stocked = recorder("stock")
    async with run_apps(billing, stock, broker=broker) as env:
        await env.settle()
    assert sorted(billed) == sorted(stocked) == ["O-1", "O-2"]


async def test_a_handler_added_to_a_running_system_starts_with_new_events(broker: Broker) -> None:
    """A new handler beside running ones sees what is published after it starts, not the history."""
    billing, billed = recorder("billing")
    async with run_apps(billing, broker=broker) as env:
        await env.publish("order.created", {"order": "O-1"})
        await env.settle()
    audit, audited = recorder("audit")
    async with run_apps(billing, audit, broker=broker) as env:
        await env.publish("order.created", {"order": "O-2"})
        await env.settle()
    assert sorted(billed) == ["O-1", "O-2"]
    assert audited == ["O-2"]


async def test_start_beginning_replays_the_history_for_a_new_handler(broker: Broker) -> None:
    """``start="beginning"`` is the explicit way to replay what the stream holds."""
    billing, billed = recorder("billing")
    async with run_apps(billing, broker=broker) as env:
        await env.publish("order.created", {"order": "O-1"})
        await env.settle()
    projection, projected = recorder("reports", start="beginning")
    async with run_apps(billing, projection, broker=broker) as env:
        await env.publish("order.created", {"order": "O-2"})
        await env.settle()
    assert sorted(projected) == ["O-1", "O-2"]
    assert sorted(billed) == ["O-1", "O-2"]


async def test_a_restarted_worker_goes_on_from_where_its_group_is(broker: Broker) -> None:
    """Restarting never replays what a group already handled, whatever its start."""
    projection, projected = recorder("reports", start="beginning")
    await publish(broker, "O-1")
    async with run_apps(projection, broker=broker) as env:
        await env.settle()
    async with run_apps(projection, broker=broker) as env:
        await env.publish("order.created", {"order": "O-2"})
        await env.settle()
    assert sorted(projected) == ["O-1", "O-2"]


def test_an_unknown_start_is_refused_at_registration() -> None:
    with pytest.raises(ConfigurationError, match="start must be one of auto, beginning, end"):
        recorder("reports", start="latest")


@pytest.mark.redis
async def test_choreo_groups_create_makes_events_wait_for_handlers_not_yet_running(redis_server: RedisServer) -> None:
    """`choreo groups create` ahead of a deploy: a handler added to a running
    system still gets what was published between the command and its start."""
    redis_server.command("FLUSHALL")
    redis_url = redis_server.url
    billing, billed = recorder("billing")
    instance = brokers.from_url(redis_url)
    await instance.connect()
    try:
        async with run_apps(billing, broker=instance) as env:
            await env.publish("order.created", {"order": "O-1"})
            await env.settle()
        done = subprocess.run(
            [sys.executable, "-m", "choreo", "groups", "create", "tests.apps.deploy:audit", "--broker", redis_url],
            capture_output=True, text=True, timeout=60, check=False,
        )
        assert done.returncode == 0, done.stderr
        assert "order.created -> audit.take (start: auto)" in done.stdout
        await publish(instance, "O-2")
        from tests.apps.deploy import audit, seen

        async with run_apps(billing, audit, broker=instance) as env:
            await env.settle()
        assert seen == ["O-2"]
        assert sorted(billed) == ["O-1", "O-2"]
    finally:
        await instance.close()


def test_choreo_groups_create_refuses_the_in_process_broker() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "choreo", "groups", "create", "tests.apps.deploy:audit", "--broker", "memory://"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: memory:// lives in one process: groups created here would vanish; give --broker"
    ]
