"""Fetching deliveries in broker tests."""

from __future__ import annotations

import time
from collections.abc import Sequence

from brokers import Broker, Delivery, Subscription


async def collect(
    broker: Broker, consumer: str, subs: Sequence[Subscription], count: int, *, timeout: float = 3.0
) -> list[Delivery]:
    """Fetch until ``count`` deliveries arrived or ``timeout`` passed."""
    deadline = time.monotonic() + timeout
    found: list[Delivery] = []
    while len(found) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        found += await broker.fetch(consumer, subs, limit=count - len(found), timeout=min(remaining, 0.5))
    return found
