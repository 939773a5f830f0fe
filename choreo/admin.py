"""Operating a running system from outside it: publish, dead letters, sagas, routes.

The library side of ``choreo publish``, ``routes``, ``dlq`` and ``saga``;
the CLI only parses arguments and prints.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any

from brokers import Broker, BrokerError, Inspection, Start, Subscription, Transport
from choreo.codec import decode_json
from choreo.dead_letters import DeadLetter
from choreo.errors import BrokerUnavailable, ChoreoError, DecodeError
from choreo.events import Event
from choreo.saga import store
from choreo.saga.definition import SagaNotFound
from choreo.saga.query import SagaQuery
from choreo.saga.record import to_result
from choreo.saga.store import KEY_PREFIX as SAGA_KEY_PREFIX

if TYPE_CHECKING:
    from choreo.app import App
    from choreo.saga.definition import SagaDefinition, SagaResult

__all__ = (
    "connected",
    "create_groups",
    "database_sagas",
    "dead_letters",
    "find_dead_letter",
    "list_sagas",
    "parse_json_object",
    "publish",
    "purge_dead_letters",
    "query_saga",
    "query_sagas",
    "replay_dead_letters",
    "resume_saga",
    "route_rows",
    "saga_status",
)

#: Dead letters read at most by one listing or replay pass.
MAX_LISTED = 100_000


@contextlib.asynccontextmanager
async def connected(broker: str | Broker | None) -> AsyncIterator[Broker]:
    """A connected broker for ``broker`` (a URL, ``CHOREO_BROKER_URL`` or
    ``memory://``); closed on exit if this opened it.

    Raises:
        ConfigurationError: an invalid URL.
        BrokerUnavailable: the broker cannot be reached.
    """
    from choreo.worker import connect_broker

    instance, owned = connect_broker(broker)
    try:
        await instance.connect()
    except BrokerError as exc:
        raise BrokerUnavailable(f"{instance.url}: {exc}") from None
    try:
        yield instance
    except BrokerError as exc:
        raise BrokerUnavailable(f"{instance.url}: {exc}") from None
    finally:
        if owned:
            with contextlib.suppress(Exception):
                await instance.close()


def parse_json_object(text: str, what: str = "data") -> dict[str, Any]:
    """Parse ``text`` as a JSON object, by the rules workers decode with
    (duplicate keys, NaN, Infinity and out-of-range numbers refused).

    Raises:
        DecodeError: not JSON, or JSON but not an object.
    """
    try:
        value = decode_json(text.encode("utf-8", "surrogatepass"))
    except DecodeError as exc:
        raise DecodeError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise DecodeError(f"{what} must be a JSON object, not {type(value).__name__}")
    return value


async def publish(
    broker: str | Broker | None, type: str, data: dict[str, Any], *, delay: float | None = None, **ids: Any
) -> Event:
    """Publish one root event and return it.

    Raises:
        DecodeError: an invalid event type or data.
        BrokerUnavailable: the broker failed.
    """
    from choreo.worker import run

    async with run(broker=broker) as runtime:
        return await runtime.publish(type, data, delay=delay, **ids)


async def create_groups(broker: Transport, apps: Sequence[App], start: Start | None = None) -> list[Subscription]:
    """Create the consumer group of every handler of ``apps`` (ahead of a
    deploy: what is published from then on waits for the handlers). Groups
    that exist keep their position.

    Args:
        broker: A connected broker.
        apps: The apps about to be deployed.
        start: Where new groups start (``"auto"``, ``"beginning"``, ``"end"``);
            ``None``: each handler's own ``start``.

    Raises:
        BrokerUnavailable: the broker failed.
    """
    subscriptions = [Subscription(r.event, r.group, start or r.start) for app in apps for r in app.routes]
    try:
        await broker.subscribe(subscriptions)
    except BrokerError as exc:
        raise BrokerUnavailable(f"{broker.url}: {exc}") from None
    return subscriptions


def route_rows(apps: Sequence[App]) -> list[dict[str, str]]:
    """One row per route: event, service, handler, emits, group, options."""
    rows = []
    for app in apps:
        for route in app.routes:
            options = [f"retries={route.retries}"]
            if route.timeout is not None:
                options.append(f"timeout={route.timeout:g}s")
            if route.concurrency is not None:
                options.append(f"concurrency={route.concurrency}")
            rows.append({
                "event": route.event,
                "service": route.service,
                "handler": route.name,
                "emits": ", ".join(route.emits) or "-",
                "group": route.group,
                "options": " ".join(options),
            })
    return rows


async def dead_letters(broker: Inspection, limit: int = 1000) -> list[DeadLetter]:
    """Dead letters, oldest first, decoded where possible."""
    return [DeadLetter.from_record(record) for record in await broker.dead_letters(limit=limit)]


async def find_dead_letter(broker: Inspection, dead_letter_id: str) -> DeadLetter:
    """The dead letter with this id.

    Raises:
        ChoreoError: there is none.
    """
    for letter in await dead_letters(broker, MAX_LISTED):
        if letter.id == dead_letter_id:
            return letter
    raise ChoreoError(f"no dead letter with id {dead_letter_id!r}")


async def replay_dead_letters(
    broker: Inspection,
    ids: Sequence[str] | None = None,
    *,
    progress: Callable[[DeadLetter | str, bool], None] | None = None,
) -> tuple[int, list[str]]:
    """Replay the given dead letters (every one if ``ids`` is ``None``) to the
    group that gave up on them.

    ``progress(item, replayed)`` is called after each one. Returns how many
    were replayed and the ids that did not exist. Replaying every one skips
    those that keep only a prefix of an oversized entry (nothing whole to
    publish again); naming one raises.

    Raises:
        BrokerUnavailable: the broker failed, or refused a named dead letter.
    """
    replayed, missing = 0, []
    targets: Sequence[DeadLetter | str] = ids if ids is not None else [
        d for d in await dead_letters(broker, MAX_LISTED) if d.size is None
    ]
    for item in targets:
        key = item.id if isinstance(item, DeadLetter) else item
        done = await broker.replay(key)
        if done:
            replayed += 1
        else:
            missing.append(key)
        if progress is not None:
            progress(item, done)
    return replayed, missing


async def purge_dead_letters(broker: Inspection, ids: Sequence[str] | None = None) -> int:
    """Delete the given dead letters (every one if ``ids`` is ``None``); return how many."""
    return await broker.purge_dead_letters(None if ids is None else list(ids))


# -- sagas ---------------------------------------------------------------------------


def _saga_definitions(apps: Sequence[App]) -> dict[str, SagaDefinition]:
    from choreo.saga.coordinator import coordinator_of

    definitions: dict[str, SagaDefinition] = {}
    for app in apps:
        coordinator = coordinator_of(app)
        if coordinator is not None:
            definitions.update(coordinator.definitions)
    return definitions


async def list_sagas(
    broker: Broker, state: str | None = None, *, apps: Sequence[App] = (), prefix: str = SAGA_KEY_PREFIX
) -> list[SagaResult]:
    """Stored sagas, oldest first, only those in ``state`` if given. Reads the
    broker's state store directly: no coordinator needs to be running.

    Raises:
        ConfigurationError: an unknown state name.
    """
    return await store.list_sagas(broker, state, prefix=prefix, definitions=_saga_definitions(apps))


async def saga_status(
    broker: Broker, saga_id: str, *, apps: Sequence[App] = (), prefix: str = SAGA_KEY_PREFIX
) -> SagaResult:
    """One saga as stored, with its steps (named as the record names them).

    Raises:
        SagaNotFound: there is no such saga.
    """
    return await store.read_saga(broker, saga_id, prefix=prefix, definitions=_saga_definitions(apps))


@contextlib.asynccontextmanager
async def database_sagas(url: str | None) -> AsyncIterator[SagaQuery]:
    """The sagas kept in the PostgreSQL database at ``url`` (``None``:
    ``CHOREO_DATABASE_URL``), open for reading.

    Raises:
        ConfigurationError: no URL, or psycopg is not installed.
        DatabaseUnavailable: the database cannot be reached.
    """
    from choreo.postgres import PostgresStateStore

    async with PostgresStateStore(url) as sagas:
        yield sagas


async def query_sagas(query: SagaQuery, state: str | None = None, *, apps: Sequence[App] = ()) -> list[SagaResult]:
    """The sagas ``query`` holds, oldest first, only those in ``state`` if given.

    Raises:
        ConfigurationError: an unknown state name.
    """
    from choreo.saga.stores import all_records

    definitions = _saga_definitions(apps)
    records = await all_records(query, store.parse_state(state))
    return [to_result(definitions.get(record.name), record) for record in records]


async def query_saga(query: SagaQuery, saga_id: str, *, apps: Sequence[App] = ()) -> SagaResult:
    """One saga that ``query`` holds.

    Raises:
        SagaNotFound: there is no such saga.
    """
    record = await query.get_record(saga_id)
    if record is None:
        raise SagaNotFound(f"no saga {saga_id!r}")
    return to_result(_saga_definitions(apps).get(record.name), record)


async def resume_saga(
    broker: str | None, saga_id: str, apps: Sequence[App], *, wait: bool = False, timeout: float | None = None
) -> SagaResult:
    """Resume a saga with the coordinator found among ``apps`` (it holds the
    saga's definition); with ``wait``, run the apps until the saga ends.

    Raises:
        ConfigurationError: no given app has a coordinator defining the saga.
        SagaNotFound: there is no such saga.
    """
    from choreo.errors import ConfigurationError
    from choreo.saga.coordinator import coordinator_of
    from choreo.worker import run

    coordinators = [c for c in (coordinator_of(app) for app in apps) if c is not None]
    if not coordinators:
        raise ConfigurationError("none of the given apps has a SagaCoordinator; name the app that defines the saga")
    async with run(*apps, broker=broker, grace=5.0):
        current = await coordinators[0].get_saga_state(saga_id)
        owner = next((c for c in coordinators if current.name in c.definitions), None)
        if owner is None:
            raise ConfigurationError(f"saga {current.name!r} is not defined by any given app's coordinator")
        return await owner.resume_saga(saga_id, wait=wait, timeout=timeout)
