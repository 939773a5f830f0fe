"""Duplicates take effect once (catalogue T8), and the ledger would see it if not.

Every test runs on the memory broker and on Redis. The ledger (``tests.ledger``)
counts committed effects per job; the negative control turns consumer dedupe
off (``dedupe_ttl=0``) and shows the same ledger catching the doubles, so a
passing ``double == 0`` means something.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from brokers import Message
from choreo import App, Event
from choreo.events import encode_event
from choreo.testing import TestEnv, run_apps
from tests import ledger
from tests.apps.lab import app

pytestmark = pytest.mark.anyio


def with_options(url: str, options: str) -> str:
    return url + ("&" if "?" in url else "?") + options


def jobs(n: int, prefix: str = "j", **data: object) -> list[Event]:
    return [Event(type="lab.job", data={"job": f"{prefix}{i}", **data}) for i in range(n)]


def effects(env: TestEnv, url: str) -> Counter[str]:
    if url.startswith("redis"):
        return ledger.effects_in_redis(url)
    return ledger.effects_in_events(env.published())


async def test_duplicates_in_flight_together_take_effect_once(broker_url: str) -> None:
    """An original and its duplicate handled at the same time: the second commit is refused, effect once.

    Regression: dedupe was checked only when an entry was handed out, so two
    copies fetched before either settled both committed their effects.
    """
    batch = [(event, None) for event in jobs(200) for _ in range(2)]
    async with run_apps(app, broker=broker_url) as env:
        await env.runtime.commit(batch)
        await env.settle(timeout=20)
        report = ledger.check([f"j{i}" for i in range(200)], effects(env, broker_url))
    assert report.ok, report


async def test_same_event_published_2_5_10_times_takes_effect_once_each(broker_url: str) -> None:
    """Re-XADDs of one id, some together and some after it settled, apply the effect once (T8)."""
    copies = {2: jobs(5, "two-"), 5: jobs(5, "five-"), 10: jobs(5, "ten-")}
    async with run_apps(app, broker=broker_url) as env:
        for k, events in copies.items():
            half = k // 2
            await env.runtime.commit([(e, None) for e in events for _ in range(half)])
            await env.settle(timeout=20)
            # The rest arrive after the original settled, straight through the broker.
            for _ in range(k - half):
                await env.broker.publish([env.runtime.outbox.message(e) for e in events])
            await env.settle(timeout=20)
        report = ledger.check([e.data["job"] for es in copies.values() for e in es], effects(env, broker_url))
    assert report.ok, report


async def test_dead_letter_replayed_until_fixed_takes_effect_once(broker_url: str, tmp_path: Path) -> None:
    """A job dead-lettered and replayed 2, 5 and 10 times applies its effect once, on the last replay (T8)."""
    for k in (2, 5, 10):
        marker, runs = tmp_path / f"fixed-{k}", tmp_path / f"runs-{k}"
        (job,) = jobs(1, f"replay{k}-", fail_until=str(marker), ledger=str(runs))
        async with run_apps(app, broker=broker_url) as env:
            await env.runtime.commit([(job, None)])
            for attempt in range(1, k + 1):
                await env.settle(timeout=10)
                if attempt == k:
                    break
                (dead,) = env.dead_letters()
                assert dead.event is not None and dead.event.id == job.id
                if attempt == k - 1:
                    marker.touch()
                assert await env.broker.replay(dead.id)
            assert env.dead_letters() == []
            assert effects(env, broker_url)[job.data["job"]] == 1
        assert ledger.executions(runs)[job.data["job"]] == k


async def test_negative_control_ledger_catches_doubles_without_dedupe(broker_url: str) -> None:
    """With dedupe off, redelivered duplicates take effect twice and the ledger reports every one of them."""
    events = jobs(50)
    expected = [e.data["job"] for e in events]
    for options, doubles in (("dedupe_ttl=86400", 0), ("dedupe_ttl=0", 50)):
        if broker_url.startswith("redis"):
            ledger.flush(broker_url)
        url = with_options(broker_url, options)
        async with run_apps(app, broker=url) as env:
            await env.runtime.commit([(e, None) for e in events])
            await env.settle(timeout=20)
            await env.broker.publish([env.runtime.outbox.message(e) for e in events])
            await env.settle(timeout=20)
            report = ledger.check(expected, effects(env, broker_url))
        assert not report.missing
        assert len(report.double) == doubles, (options, report)


async def test_ledger_reports_missing_and_unexpected() -> None:
    """The oracle itself: a lost job is missing, a stray effect is unexpected, a repeat is double."""
    report = ledger.check(["a", "b", "c"], Counter({"a": 1, "b": 2, "z": 1}))
    assert report.missing == ("c",) and report.double == {"b": 2} and report.unexpected == ("z",)
    assert not report.ok
    assert ledger.check(["a"], Counter({"a": 1})).ok


async def test_raw_duplicate_entry_is_acked_without_effect(broker_url: str) -> None:
    """A duplicate written by another producer (same id, own entry) is dropped by the group."""
    (event,) = jobs(1, "raw-")
    async with run_apps(app, broker=broker_url) as env:
        message = env.runtime.outbox.message(event)
        await env.broker.publish([message])
        await env.settle(timeout=10)
        # Another producer of the same event keys it as the event says (its
        # correlation id): with partitions, dedupe works within one.
        await env.broker.publish([Message(message.topic, message.id, message.body, key=message.key)])
        await env.settle(timeout=10)
        assert ledger.check([event.data["job"]], effects(env, broker_url)).ok


# -- the entry's id and the event's id ---------------------------------------------


def _ledger_app() -> tuple[App, list[str]]:
    ran: list[str] = []
    service = App("audit")

    @service.on_event("audit.recorded")
    async def record(event: Event) -> None:
        ran.append(event.id)

    return service, ran


async def test_one_event_written_under_two_entry_ids_takes_effect_once(broker_url: str) -> None:
    """A copy of an event under another entry id is dead-lettered as a mismatch, never run twice."""
    service, ran = _ledger_app()
    event = Event(type="audit.recorded", data={"n": 1})
    body = encode_event(event)
    async with run_apps(service, broker=broker_url) as env:
        await env.broker.publish([Message("audit.recorded", event.id, body)])
        await env.broker.publish([Message("audit.recorded", "another-entry-id", body)])
        await env.settle()
    assert ran == [event.id]
    [dead] = env.dead_letters()
    assert "id mismatch" in dead.reason and "'another-entry-id'" in dead.reason and event.id in dead.reason
    assert dead.raw == body and dead.attempts == 1


async def test_two_events_written_under_one_entry_id_lose_neither_silently(broker_url: str) -> None:
    """A second event reusing a settled entry id is dead-lettered with the reason, not dropped as a duplicate."""
    service, ran = _ledger_app()
    first, second = Event(type="audit.recorded", data={"n": 1}), Event(type="audit.recorded", data={"n": 2})
    async with run_apps(service, broker=broker_url) as env:
        await env.broker.publish([Message("audit.recorded", first.id, encode_event(first))])
        await env.settle()
        await env.broker.publish([Message("audit.recorded", first.id, encode_event(second))])
        await env.settle()
    assert ran == [first.id]
    [dead] = env.dead_letters()
    assert "id mismatch" in dead.reason and second.id in dead.reason
    assert dead.raw == encode_event(second)


async def test_a_true_duplicate_after_settling_is_acked_without_running_the_handler(broker_url: str) -> None:
    """The same event again, after it was handled: acked, no second run, no dead letter, nothing pending."""
    service, ran = _ledger_app()
    event = Event(type="audit.recorded", data={"n": 1})
    async with run_apps(service, broker=broker_url) as env:
        await env.broker.publish([Message("audit.recorded", event.id, encode_event(event))])
        await env.settle()
        await env.broker.publish([Message("audit.recorded", event.id, encode_event(event))])
        await env.settle()
    assert ran == [event.id]
    assert env.dead_letters() == []
