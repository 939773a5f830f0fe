"""Messages and deliveries: the values the transport role moves (see
``brokers.base`` for the contract they take part in)."""

from __future__ import annotations

from typing import Literal

import attrs

from brokers.speedups import slot_setters

__all__ = ("STARTS", "Delivery", "Message", "Start", "Subscription", "new_delivery", "new_message")


@attrs.frozen
class Message:
    """A message handed to the broker for publishing.

    Attributes:
        topic: Where it goes (one stream per topic on Redis).
        id: Producer-assigned, unique; consumers dedupe on it.
        body: Opaque bytes.
        delay: Seconds until it becomes deliverable; ``None`` or 0 is now.
        group: If set, only this group of ``topic`` receives it.
        key: The partition key: the correlation id of the business
            transaction it belongs to, or ``None``. A broker with partitions
            (Redis Cluster) publishes a message outside a delivery in the
            partition of its key (of its topic without one), so copies of it
            meet and are deduped; a commit that settles a delivery, and so
            everything it emits, stays in that delivery's partition; a commit
            with state writes and no delivery goes to its first keyed
            message's partition (else its first state key's).
    """

    topic: str
    id: str
    body: bytes
    delay: float | None = None
    group: str | None = None
    key: str | None = None


#: Where a new consumer group starts reading its topic.
Start = Literal["auto", "beginning", "end"]
STARTS: tuple[Start, ...] = ("auto", "beginning", "end")


def _check_start(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if value not in STARTS:
        raise ValueError(f"subscription start {value!r} is not one of {', '.join(STARTS)}")


@attrs.frozen
class Subscription:
    """A consumer group on a topic.

    Attributes:
        topic: The topic the group reads.
        group: The group's name.
        start: Where the group starts if it does not exist yet (an existing
            group always goes on from where it is). ``"auto"``: at the
            topic's beginning if no group reads the topic yet (nothing
            published before the first consumers is lost), else at its end
            (a handler added to a running system sees new messages only);
            ``"beginning"``: every message the topic still holds;
            ``"end"``: new messages only.
    """

    topic: str
    group: str
    start: Start = attrs.field(default="auto", validator=_check_start)


@attrs.frozen
class Delivery:
    """One hand-out of a message to a consumer of a group.

    Attributes:
        topic: The topic the message was published to.
        group: The group it was delivered to.
        consumer: The consumer that holds it now.
        entry_id: The broker's id of this entry (not the producer's id).
        message_id: The producer's id, or ``None`` if the entry had none.
        body: The message bytes, exactly as published.
        deliveries: How many times this entry has been handed out, this one
            included (1 on first delivery).
        duplicate: The message id was already settled in this group: the
            consumer should check that the message is what its id says (a
            mismatch is bad input) and commit it with ``done=True``, which
            acks it as ``DUPLICATE`` without applying anything.
    """

    topic: str
    group: str
    consumer: str
    entry_id: str
    message_id: str | None
    body: bytes
    deliveries: int
    duplicate: bool = False


_new = object.__new__
# Message and Delivery have no converters or validators to skip (and the
# builders keep Message's defaults), so setting their slots makes exactly what
# __init__ makes (``slot_setters``).
_message_slots = slot_setters(Message)
_delivery_slots = slot_setters(Delivery)


def new_message(
    topic: str, id: str, body: bytes, delay: float | None = None, group: str | None = None, key: str | None = None
) -> Message:
    """``Message(topic, id, body, delay, group, key)``, built faster."""
    message = _new(Message)
    set_topic, set_id, set_body, set_delay, set_group, set_key = _message_slots
    set_topic(message, topic)
    set_id(message, id)
    set_body(message, body)
    set_delay(message, delay)
    set_group(message, group)
    set_key(message, key)
    return message


def new_delivery(
    topic: str,
    group: str,
    consumer: str,
    entry_id: str,
    message_id: str | None,
    body: bytes,
    deliveries: int,
    duplicate: bool = False,
) -> Delivery:
    """``Delivery(...)`` with the fields in order, built faster."""
    delivery = _new(Delivery)
    set_topic, set_group, set_consumer, set_entry, set_message, set_body, set_deliveries, set_duplicate = (
        _delivery_slots
    )
    set_topic(delivery, topic)
    set_group(delivery, group)
    set_consumer(delivery, consumer)
    set_entry(delivery, entry_id)
    set_message(delivery, message_id)
    set_body(delivery, body)
    set_deliveries(delivery, deliveries)
    set_duplicate(delivery, duplicate)
    return delivery
