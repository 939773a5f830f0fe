"""choreo's transport layer: a broker contract (by role: ``Transport``,
``State``, ``Inspection``; ``Broker`` is all three) and its adapters.

Importable on its own; never imports ``choreo``. ``from_url`` picks the adapter
by scheme: ``memory://``, ``redis://`` / ``rediss://``, or Redis Cluster's
``redis+cluster://`` / ``rediss+cluster://``. The Redis adapter is
imported only when asked for.
"""

from __future__ import annotations

from brokers.base import (
    DEAD_LETTER_KEPT,
    STARTS,
    TOPIC_PATTERN,
    Broker,
    BrokerError,
    CommitStatus,
    DeadLetterRecord,
    DelayedMessage,
    Delivery,
    GroupBacklog,
    GroupCursor,
    HistoryEntry,
    Inspection,
    Message,
    PendingEntry,
    Start,
    State,
    StateWrite,
    Subscription,
    Transport,
    Versioned,
)
from brokers.options import BrokerOptions, parse_url, redact_url

__all__ = (
    "DEAD_LETTER_KEPT",
    "STARTS",
    "TOPIC_PATTERN",
    "Broker",
    "BrokerError",
    "BrokerOptions",
    "CommitStatus",
    "DeadLetterRecord",
    "DelayedMessage",
    "Delivery",
    "GroupBacklog",
    "GroupCursor",
    "HistoryEntry",
    "Inspection",
    "Message",
    "PendingEntry",
    "Start",
    "State",
    "StateWrite",
    "Subscription",
    "Transport",
    "Versioned",
    "from_url",
    "parse_url",
    "redact_url",
)


def from_url(url: str) -> Broker:
    """Create an unconnected broker for ``url``.

    Raises:
        BrokerError: unknown scheme or invalid query parameters.
    """
    scheme, options = parse_url(url)
    if scheme == "memory":
        from brokers.memory import MemoryBroker

        return MemoryBroker(options=options)
    if scheme in ("redis", "rediss", "redis+cluster", "rediss+cluster"):
        from brokers.redis_streams import RedisStreamsBroker

        return RedisStreamsBroker(url, options=options)
    raise BrokerError(f"unknown broker scheme {scheme!r} in {redact_url(url)}: use memory://, redis://, rediss://, "
                      "redis+cluster:// or rediss+cluster://")
