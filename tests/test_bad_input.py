"""Bad input never stops a worker: each kind gets a clear reason in a dead
letter (or a clear exception at publish time), and good events keep flowing."""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import pytest

from brokers import DEAD_LETTER_KEPT, BrokerError, Message
from choreo import App, DecodeError, admin
from choreo.testing import run_apps


def counting_app() -> tuple[App, list[dict[str, Any]]]:
    app = App("ledger")
    seen: list[dict[str, Any]] = []

    @app.on_event("payment.recorded")
    @app.emits("payment.booked")
    async def book(data: dict[str, Any]) -> None:
        seen.append(data)

    return app, seen


def good(n: int) -> bytes:
    return json.dumps({"type": "payment.recorded", "id": f"good-{n}", "data": {"n": n}}).encode()


BAD_BODIES = {
    "malformed_json": (b'{"type": "payment.recorded", "id": ', "malformed JSON"),
    "not_utf8": (b'{"type": "payment.recorded", "id": "x\xff\xfe"}', "not UTF-8"),
    "not_an_object": (b'["payment.recorded"]', "not an object"),
    "data_not_an_object": (b'{"type": "payment.recorded", "id": "b1", "data": [1, 2]}', "'data' must be a JSON object"),
    "nan": (b'{"type": "payment.recorded", "id": "b2", "data": {"amount": NaN}}', "NaN is not valid JSON"),
    "infinity": (b'{"type": "payment.recorded", "id": "b3", "data": {"amount": -Infinity}}', "Infinity"),
    "deep_nesting": (
        b'{"type": "payment.recorded", "id": "b4", "data": {"x": ' + b"[" * 5000 + b"]" * 5000 + b"}}",
        "nesting deeper",
    ),
    "moderate_nesting": (
        b'{"type": "payment.recorded", "id": "b5", "data": {"x": ' + b"[" * 100 + b"]" * 100 + b"}}",
        "nesting deeper",
    ),
    "duplicate_keys": (b'{"type": "payment.recorded", "id": "b6", "id": "b7"}', "duplicate key"),
    "huge_int": (b'{"type": "payment.recorded", "id": "b8", "data": {"n": ' + b"9" * 5000 + b"}}", "malformed JSON"),
    "missing_id": (b'{"type": "payment.recorded", "data": {}}', "'id'"),
    "missing_type": (b'{"id": "b9", "data": {}}', "missing field 'type'"),
    "hostile_type": (b'{"type": "../../etc/passwd", "id": "b10"}', "invalid event type"),
    "type_mismatch": (b'{"type": "payment.refunded", "id": "b11", "data": {}}', "arrived on topic"),
    "number_out_of_range": (b'{"type": "payment.recorded", "id": "b12", "data": {"n": 1e400}}', "out of range"),
    "missing_data": (b'{"type": "payment.recorded", "id": "b13"}', "missing field 'data'"),
    "unknown_version": (b'{"v": 99, "type": "payment.recorded", "id": "b14", "data": {}}', "unknown wire format"),
    "id_too_long": (b'{"type": "payment.recorded", "id": "' + b"i" * 200 + b'", "data": {}}', "over the limit"),
    "correlation_id_too_long": (
        b'{"type": "payment.recorded", "id": "b15", "correlation_id": "' + b"c" * 200 + b'", "data": {}}',
        "'correlation_id' must be a string of at most 128",
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD_BODIES))
async def test_bad_message_is_dead_lettered_with_reason_and_good_ones_flow(
    broker_url: str, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """One bad message among good ones: exactly one dead letter with the reason; all good ones handled."""
    body, reason = BAD_BODIES[kind]
    app, seen = counting_app()
    async with run_apps(app, broker=broker_url) as env:
        await env.broker.publish([Message("payment.recorded", "good-0", good(0))])
        await env.broker.publish([Message("payment.recorded", f"bad-{kind}", body)])
        await env.broker.publish([Message("payment.recorded", "good-1", good(1))])
        await env.settle()
    assert sorted(d["n"] for d in seen) == [0, 1]
    [dead] = env.dead_letters()
    assert reason in dead.reason, dead.reason
    assert dead.raw == body and dead.group == "ledger.book" and dead.attempts == 1
    assert any(reason in r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)


async def test_oversized_message_is_dead_lettered_before_parsing(broker_url: str) -> None:
    """A message over the size limit is refused by size, whatever it holds."""
    app, seen = counting_app()
    async with run_apps(app, broker=broker_url, max_size=1024) as env:
        big = json.dumps({"type": "payment.recorded", "id": "big", "data": {"blob": "x" * 2000}}).encode()
        await env.broker.publish([Message("payment.recorded", "big", big)])
        await env.broker.publish([Message("payment.recorded", "good-0", good(0))])
        await env.settle()
    [dead] = env.dead_letters()
    assert "over the 1024-byte limit" in dead.reason
    assert [d["n"] for d in seen] == [0]


async def test_an_oversized_entry_leaves_a_bounded_dead_letter_with_its_size_and_digest(
    broker_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A 3 MB entry over the 1 MiB limit never reaches the worker: the broker
    dead-letters its first bytes, size and SHA-1, logs it, refuses to replay
    it, and the events around it flow."""
    app, seen = counting_app()
    big = json.dumps({"type": "payment.recorded", "id": "big", "data": {"blob": "x" * 3_000_000}}).encode()
    async with run_apps(app, broker=broker_url) as env:
        await env.broker.publish([Message("payment.recorded", "big", big)])
        await env.broker.publish([Message("payment.recorded", "good-0", good(0))])
        await env.settle()
        [dead] = env.dead_letters()
        with pytest.raises(BrokerError, match="cannot be replayed"):
            await env.broker.replay(dead.id)
        assert [d.id for d in await admin.dead_letters(env.broker)] == [dead.id]
    assert [d["n"] for d in seen] == [0]
    assert dead.raw == big[:DEAD_LETTER_KEPT] and dead.event is None
    assert (dead.size, dead.sha1) == (len(big), hashlib.sha1(big).hexdigest())
    assert dead.reason == f"oversized entry: {len(big)} bytes, over the 1048576-byte limit"
    assert any(dead.reason in r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)


async def test_publish_refuses_what_cannot_go_on_the_wire(broker_url: str) -> None:
    """Publishing NaN, non-JSON data, an invalid type or an oversized payload raises a clear error."""
    async with run_apps(broker=broker_url, max_size=1024) as env:
        with pytest.raises(DecodeError, match="not valid JSON"):
            await env.publish("payment.recorded", {"amount": float("nan")})
        with pytest.raises(DecodeError, match="not valid JSON"):
            await env.publish("payment.recorded", {"when": object()})
        with pytest.raises(DecodeError, match="invalid event type"):
            await env.publish("payment recorded!", {})
        with pytest.raises(DecodeError, match="over the 1024-byte limit"):
            await env.publish("payment.recorded", {"blob": "x" * 2000})
        await env.settle()
    assert env.published() == []


@pytest.mark.parametrize(
    ("ids", "shown"),
    [
        ({"id": ""}, "invalid id ''"),
        ({"id": "x" * 100_000}, "invalid id 'xxx"),
        ({"id": "has space"}, "invalid id 'has space'"),
        ({"correlation_id": "a/b"}, "invalid correlation_id"),
        ({"saga_id": "s" * 129}, "invalid saga_id"),
        ({"causation_id": "caf\u00e9"}, "invalid causation_id"),
    ],
)
async def test_publish_refuses_ids_outside_the_documented_charset_and_length(
    broker_url: str, ids: dict[str, str], shown: str
) -> None:
    """Ids are 1 to 128 letters, digits or ._:- ; anything else fails at publish, not at every consumer."""
    async with run_apps(broker=broker_url) as env:
        with pytest.raises(DecodeError, match=shown):
            await env.publish("payment.recorded", {}, **ids)
        event = await env.publish("payment.recorded", {}, id="01JB:order-42_x.1", correlation_id="order-42")
        await env.settle()
    assert [e.id for e in env.published()] == [event.id]


async def test_publish_refuses_names_reserved_by_the_brokers(broker_url: str) -> None:
    """A type may not start with '_' or '-': `_dead` would be the dead-letter stream."""
    async with run_apps(broker=broker_url) as env:
        for reserved in ("_dead", "_delayed", "-x", "_x.y"):
            with pytest.raises(DecodeError, match="invalid event type"):
                await env.publish(reserved, {})
        await env.settle()
    assert env.published() == []


async def test_handler_that_raises_forever_does_not_hold_up_others(broker_url: str) -> None:
    """A poison event is dead-lettered after its retries while other events are handled."""
    app = App("ledger")
    handled: list[int] = []

    @app.on_event("payment.recorded", retries=2, retry_delay=0.01)
    async def book(data: dict[str, Any]) -> None:
        if data["n"] == 0:
            raise ValueError("poison")
        handled.append(data["n"])

    async with run_apps(app, broker=broker_url) as env:
        for n in range(5):
            await env.publish("payment.recorded", {"n": n})
        await env.settle()
    assert sorted(handled) == [1, 2, 3, 4]
    [dead] = env.dead_letters()
    assert "poison" in dead.reason and dead.attempts == 3


async def test_handler_returning_a_non_dict_is_dead_lettered_with_a_hint(broker_url: str) -> None:
    """Returning something that is not a dict, None or Emit is a programming error."""
    app = App("ledger")

    @app.on_event("payment.recorded")
    @app.emits("payment.booked")
    async def book(data: dict[str, Any]) -> str:
        return "done"

    async with run_apps(app, broker=broker_url) as env:
        await env.publish("payment.recorded", {})
        await env.settle()
    [dead] = env.dead_letters()
    assert "returned str" in dead.reason
