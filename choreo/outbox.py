"""``Outbox``: the one path by which events leave a runtime.

Root publishes, a saga's start (events with a state write) and a handler's
emits (with the delivery's ack) all go through one object: it encodes events
into messages, commits them with any state writes, delays and ack, maps
broker failures, and tells the middleware what was published, once, after
the commit.

Concurrent root publishes are not queued here: each is one ``commit`` (or
``publish``) call, and an adapter with a round trip sends the calls made
while one is on the wire together, each applied and answered on its own
(``brokers.base``, "Concurrent commits"; on Redis ``ScriptBatcher``). A
second queue in front of it was not worth its cost: 100 concurrent
``publish()`` calls already share a round trip (0.01 round trips per
publish) and run at the speed of a raw pipelined XADD publisher
(``bench/publish_redis.py``), and the memory broker has no round trip to share.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

from brokers import Broker, BrokerError, CommitStatus, Delivery, Message, StateWrite
from brokers.base import new_message
from choreo.errors import BrokerUnavailable, DecodeError
from choreo.events import DEFAULT_MAX_SIZE, Event, decode_event, encode_event, with_headers
from choreo.failpoints import ACTIVE, hit
from choreo.middleware import Hooks

__all__ = ("Outbox", "Unencodable")

log = logging.getLogger("choreo.dispatcher")


class Unencodable(DecodeError):
    """An event the running handler emits cannot be encoded (not JSON, over
    ``max_size``). Retrying cannot help, so the dispatcher dead-letters the
    delivery at once, whether it encoded the event itself or the handler did
    through ``Outbox.emitted`` (a database's outbox, written in the handler)."""


class Outbox:
    """Encodes and commits the events of one runtime.

    Args:
        broker: Where events go.
        hooks: The runtime's middleware, told of each published event.
        max_size: Largest encoded event, in bytes.
    """

    __slots__ = ("broker", "hooks", "max_size")

    def __init__(self, broker: Broker, hooks: Hooks, *, max_size: int = DEFAULT_MAX_SIZE) -> None:
        self.broker = broker
        self.hooks = hooks
        self.max_size = max_size

    def message(self, event: Event, *, delay: float | None = None, group: str | None = None) -> Message:
        """``event`` encoded for the broker, due after ``delay`` seconds, for
        one ``group`` only if given (a retry).

        Raises:
            DecodeError: the event is not JSON or is over ``max_size``.
        """
        return new_message(
            event.type, event.id, encode_event(event, max_size=self.max_size), delay, group, event.correlation_id
        )

    def emitted(self, event: Event, delay: float | None = None) -> Message:
        """``event``, which the handler running now emits, encoded as the
        dispatcher encodes a handler's events: the middleware's ``headers``
        (a ``traceparent``) added to it first. For events committed elsewhere
        (a database's outbox) that ``relay`` publishes later.

        Raises:
            Unencodable: the event is not JSON or is over ``max_size``.
        """
        if self.hooks.headers:
            self.hooks.stamp(event)
        try:
            return self.message(event, delay=delay)
        except DecodeError as exc:
            raise Unencodable(str(exc)) from None

    @contextlib.contextmanager
    def publishing(self, events: Sequence[tuple[Event, float | None]]) -> Iterator[list[Message]]:
        """``events`` of a root commit made elsewhere (a database's outbox),
        encoded inside the middleware's ``publishing`` context managers,
        which are exited when the block ends (with its exception, if any),
        as ``Runtime.commit`` does around a broker commit.

        Raises:
            DecodeError: an event is not JSON or is over ``max_size``.
        """
        if not self.hooks.publishing:
            yield [self.message(event, delay=delay) for event, delay in events]
            return
        # Copies with headers of their own, for the middleware to add to.
        own = [(with_headers(event, dict(event.headers)), delay) for event, delay in events]
        with self.hooks.enter(self.hooks.publishing, self.broker, [event for event, _ in own]):
            yield [self.message(event, delay=delay) for event, delay in own]

    async def commit(
        self, events: Sequence[tuple[Event, float | None]], state: Sequence[StateWrite] = ()
    ) -> CommitStatus:
        """Publish events (with their delays) and write state in one atomic
        step, outside any delivery. Concurrent calls share the broker's round
        trips and each keeps its own status and error (see the module doc).

        Returns:
            ``OK``, or ``CONFLICT`` when a state write lost its compare-and-set
            (then nothing was published).

        Raises:
            DecodeError: an event cannot be encoded (nothing was published).
            BrokerUnavailable: the broker refused or failed.
        """
        messages = [self.message(event, delay=delay) for event, delay in events]
        try:
            if state:
                status = await self.broker.commit(None, publish=messages, state=state)
            else:
                await self.broker.publish(messages)
                status = CommitStatus.OK
        except BrokerError as exc:
            raise BrokerUnavailable(f"publish to {self.broker.url} failed: {exc}") from exc
        if status is CommitStatus.OK and self.hooks.on_publish:
            self.hooks.published(events)
        return status

    async def relay(self, messages: Sequence[Message]) -> None:
        """Publish events already committed elsewhere (a database's outbox),
        encoded, and tell the middleware of them (decoded again only then).

        Raises:
            BrokerUnavailable: the broker refused or failed.
        """
        try:
            await self.broker.publish(messages)
        except BrokerError as exc:
            raise BrokerUnavailable(f"publish to {self.broker.url} failed: {exc}") from exc
        if self.hooks.on_publish:
            self.hooks.published([(decode_event(m.body, max_size=len(m.body)), m.delay) for m in messages])

    async def settle(
        self,
        delivery: Delivery,
        group: str,
        *,
        publish: Sequence[Message] = (),
        emitted: Sequence[tuple[Event, float | None]] = (),
        dead_letter: str | None = None,
        state: Sequence[StateWrite] = (),
        done: bool = True,
    ) -> CommitStatus | None:
        """Settle ``delivery`` of ``group``: publish the encoded messages,
        write state and ack (or dead-letter) in one commit. ``emitted`` are
        the events (with their delays) that ``publish`` encodes, which the
        middleware hears of when it succeeds (a retry is not a new event).

        Returns:
            The broker's status, or ``None`` when the commit failed: nothing
            is lost, the delivery stays pending and comes back after its
            lease. Never raises except on cancellation.
        """
        if ACTIVE:
            await hit("dispatcher.before_commit", group)
        try:
            status = await self.broker.commit(
                delivery, publish=publish, dead_letter=dead_letter, state=state, done=done
            )
        except Exception as exc:
            log.error("%s: commit of %s failed, it will be redelivered: %s", group, delivery.entry_id, exc)
            return None
        if ACTIVE:
            await hit("dispatcher.after_commit", group)
        if status is CommitStatus.OK:
            if emitted and self.hooks.on_publish:
                self.hooks.published(emitted)
        elif status is CommitStatus.LEASE_LOST:
            log.warning("%s: lease on %s was lost; another consumer owns it now", group, delivery.entry_id)
        elif status is CommitStatus.DUPLICATE:
            log.info("%s: %s duplicates message %s, settled already; dropped", group, delivery.entry_id,
                     delivery.message_id)
        return status
