"""Property test of the in-memory broker over random schedules.

Hypothesis drives publishes (with producer duplicates), fetches by several
consumers, commits (effects, dead letters, retries), crashes that abandon
deliveries, and jumps of the injected clock. After every step and after a final
drain, the invariants hold:

* a commit by anyone but the current holder of an entry is refused;
* per group, every published message id takes effect exactly once, or is
  dead-lettered (a handler's choice or ``max_deliveries``) and takes no effect;
* nothing is lost: after the drain every group is idle.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from brokers import CommitStatus, Delivery, Message, Subscription
from brokers.memory import MemoryBroker
from brokers.options import BrokerOptions

VT = 10.0
MAX_DELIVERIES = 3
TOPIC = "t"
GROUPS = (Subscription(TOPIC, "g1"), Subscription(TOPIC, "g2"))
CONSUMERS = ("c1", "c2", "c3")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class MemoryBrokerSchedules(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.clock = Clock()
        options = BrokerOptions(visibility_timeout=VT, max_deliveries=MAX_DELIVERIES)
        self.broker = MemoryBroker(options, clock=self.clock)
        self.run(self.broker.connect())
        self.run(self.broker.subscribe(GROUPS))
        self.published: set[str] = set()
        self.held: list[Delivery] = []
        #: (group, entry id) -> the newest delivery of that entry; older ones are stale.
        self.latest: dict[tuple[str, str], Delivery] = {}
        self.settled: set[tuple[str, str]] = set()  # (group, entry id) acked by a commit
        self.effects: Counter[tuple[str, str]] = Counter()  # (group, message id)
        self.rejected: Counter[tuple[str, str]] = Counter()  # dead-lettered by a handler
        self.violations: list[str] = []

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        self.run(self.broker.close())
        self.loop.close()

    # -- rules -------------------------------------------------------------------------------------------------

    @rule(ids=st.lists(st.integers(0, 7), min_size=1, max_size=4))
    def publish(self, ids: list[int]) -> None:
        """Publish; ids repeat across calls and within one, as a retrying producer's would."""
        messages = [Message(TOPIC, f"m{i}", f"body-{i}".encode()) for i in ids]
        self.run(self.broker.publish(messages))
        self.published.update(m.id for m in messages)

    @rule(consumer=st.sampled_from(CONSUMERS), limit=st.integers(1, 5))
    def fetch(self, consumer: str, limit: int) -> None:
        for delivery in self.run(self.broker.fetch(consumer, GROUPS, limit=limit, timeout=0)):
            key = (delivery.group, delivery.entry_id)
            if key in self.settled:
                self.violations.append(f"settled entry handed out again: {delivery}")
            self.latest[key] = delivery
            self.held.append(delivery)

    @precondition(lambda self: self.held)
    @rule(pick=st.integers(0, 1000), how=st.sampled_from(["effect", "dead_letter", "retry"]))
    def commit(self, pick: int, how: str) -> None:
        delivery = self.held.pop(pick % len(self.held))
        key = (delivery.group, delivery.entry_id)
        current = self.latest.get(key) is delivery and key not in self.settled
        if delivery.duplicate:
            # A consumer acks a copy of a message its group settled already
            # (only another message under the same id would be dead-lettered).
            how = "effect"
        if how == "effect":
            status = self.run(self.broker.commit(delivery))
        elif how == "dead_letter":
            status = self.run(self.broker.commit(delivery, dead_letter="rejected by handler"))
        else:
            retry = Message(TOPIC, delivery.message_id or "", delivery.body, delay=VT / 2, group=delivery.group)
            status = self.run(self.broker.commit(delivery, publish=[retry], done=False))
        if not current and status is not CommitStatus.LEASE_LOST:
            self.violations.append(f"stale commit of {delivery} returned {status}")
        if status in (CommitStatus.OK, CommitStatus.DUPLICATE):
            self.settled.add(key)
        if status is CommitStatus.OK and how != "retry":
            target = self.effects if how == "effect" else self.rejected
            target[(delivery.group, delivery.message_id or "")] += 1

    @precondition(lambda self: self.held)
    @rule(consumer=st.sampled_from(CONSUMERS))
    def crash(self, consumer: str) -> None:
        """The consumer dies: its deliveries are abandoned, to be reclaimed after their lease."""
        self.held = [d for d in self.held if d.consumer != consumer]

    @precondition(lambda self: self.held)
    @rule(pick=st.integers(0, 1000))
    def extend(self, pick: int) -> None:
        delivery = self.held[pick % len(self.held)]
        key = (delivery.group, delivery.entry_id)
        renewed = self.run(self.broker.extend(delivery))
        if renewed and (self.latest.get(key) is not delivery or key in self.settled):
            self.violations.append(f"stale delivery renewed: {delivery}")

    @rule(seconds=st.sampled_from([0.0, 1.0, VT / 2, VT, VT + 0.5, 3 * VT]))
    def advance(self, seconds: float) -> None:
        self.clock.now += seconds
        self.broker.poke()

    # -- invariants --------------------------------------------------------------------------------------------

    @invariant()
    def no_violation_so_far(self) -> None:
        assert not self.violations, self.violations
        assert all(n == 1 for n in self.effects.values()), self.effects
        assert not set(self.effects) & set(self.rejected)

    def drain_and_check(self) -> None:
        """Settle everything still outstanding, then hold every message to its outcome."""
        self.held.clear()  # every consumer crashes; a fresh one finishes the work
        for _ in range(100):
            self.clock.now += VT + 1
            found = self.run(self.broker.fetch("drainer", GROUPS, limit=100, timeout=0))
            for delivery in found:
                status = self.run(self.broker.commit(delivery))
                if status is CommitStatus.OK:
                    self.effects[(delivery.group, delivery.message_id or "")] += 1
            if not found and all(b.idle for b in self.run(self.broker.backlog(GROUPS))):
                break
        else:
            raise AssertionError("the broker never went idle")
        exhausted = {
            (r.group, r.message_id or "")
            for r in self.run(self.broker.dead_letters())
            if r.reason == "max deliveries exceeded"
        }
        for sub in GROUPS:
            for message_id in self.published:
                key = (sub.group, message_id)
                outcomes = self.effects[key] + self.rejected[key]
                assert outcomes == 1 or (outcomes == 0 and key in exhausted), (key, self.effects, self.rejected)
        assert not self.violations, self.violations


class DrainedSchedules(MemoryBrokerSchedules):
    def teardown(self) -> None:
        try:
            self.drain_and_check()
        finally:
            super().teardown()


@pytest.mark.filterwarnings("ignore::hypothesis.errors.NonInteractiveExampleWarning")
def test_random_schedules_keep_every_invariant() -> None:
    """Random publishes, duplicates, fetches, commits, crashes and clock jumps: 0 invariant violations."""
    run = settings(max_examples=150, stateful_step_count=40, deadline=None)(DrainedSchedules).TestCase
    run().runTest()
