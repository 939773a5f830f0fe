"""Conformance (catalogue T18): one scenario file, run step by step on the memory
broker and on Redis, gives the same result at every step.

The scenario (``tests/scenarios/broker_conformance.json``) is data: each step
names a broker operation and the result it must observe (message ids with
delivery counts, commit statuses, dead letters, backlogs, state). Time-based
steps wait with deadlines (``wait``), on real time on both brokers.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

import brokers
from brokers import Broker, CommitStatus, Delivery, Message, StateWrite, Subscription

pytestmark = pytest.mark.anyio

SCENARIO = json.loads((Path(__file__).parent / "scenarios" / "broker_conformance.json").read_text())


def subs(pairs: list[list[str]]) -> list[Subscription]:
    return [Subscription(topic, group) for topic, group in pairs]


def messages(pairs: list[list[str]]) -> list[Message]:
    return [Message(topic, mid, f"body of {mid}".encode()) for topic, mid in pairs]


async def fetch(broker: Broker, step: dict[str, Any]) -> list[Delivery]:
    want = len(step["expect"])
    deadline = time.monotonic() + step.get("wait", 0.2)
    found: list[Delivery] = []
    while True:
        left = max(0.0, deadline - time.monotonic())
        found += await broker.fetch(step["consumer"], subs(step["subs"]), limit=step.get("limit", 10),
                                    timeout=min(left, 0.1))
        if (want and len(found) >= want) or time.monotonic() >= deadline:
            return found


async def run_step(broker: Broker, step: dict[str, Any], held: dict[str, list[Delivery]]) -> Any:
    op = step["op"]
    if op == "subscribe":
        await broker.subscribe(subs(step["subs"]))
        return None
    if op == "publish":
        await broker.publish(messages(step["messages"]))
        return None
    if op == "fetch":
        found = await fetch(broker, step)
        held[step["as"]] = found
        return [[d.message_id, d.deliveries, *(["duplicate"] if d.duplicate else [])] for d in found]
    if op in ("commit", "extend"):
        name, index = step["ref"].split(".")
        delivery = held[name][int(index)]
        if op == "extend":
            return await broker.extend(delivery)
        if "retry_delay" in step:
            retry = Message(delivery.topic, delivery.message_id or "", delivery.body, delay=step["retry_delay"],
                            group=delivery.group)
            status = await broker.commit(delivery, publish=[retry], done=False)
        else:
            status = await broker.commit(delivery, publish=messages(step.get("publish", [])),
                                         dead_letter=step.get("dead_letter"))
        return status.value
    if op == "dead_letters":
        return [[r.message_id, r.group, r.reason, r.deliveries] for r in await broker.dead_letters()]
    if op == "replay":
        return await broker.replay((await broker.dead_letters())[step["index"]].id)
    if op == "backlog":
        return [[b.ready, b.pending, b.delayed] for b in await broker.backlog(subs(step["subs"]))]
    if op == "state":
        write = StateWrite(step["key"], step["value"].encode(), step["expected_version"])
        return (await broker.commit(None, state=[write])).value
    if op == "get_state":
        value = await broker.get_state(step["key"])
        return None if value is None else [value.value.decode(), value.version]
    raise AssertionError(f"unknown op {op!r}")


async def test_scenario_gives_the_expected_result_at_every_step(broker_url: str) -> None:
    """Every step of the conformance scenario observes exactly its `expect` (so both brokers agree)."""
    broker = brokers.from_url(broker_url + ("&" if "?" in broker_url else "?") + SCENARIO["options"])
    await broker.connect()
    held: dict[str, list[Delivery]] = {}
    transcript = []
    try:
        for number, step in enumerate(SCENARIO["steps"]):
            if "op" not in step:
                continue
            got = await run_step(broker, step, held)
            transcript.append(got)
            if "expect" in step:
                assert got == step["expect"], f"step {number} {step['op']}: {got!r} != {step['expect']!r}"
    finally:
        await broker.close()
    assert CommitStatus.DUPLICATE.value in transcript
