"""Named failpoints: crash, fail or stall a process at a chosen point, for tests.

Set ``CHOREO_FAILPOINTS`` before the process starts; it is read once, when this
module is imported::

    CHOREO_FAILPOINTS="dispatcher.before_commit=kill"
    CHOREO_FAILPOINTS="dispatcher.after_commit:ledger.work=raise;worker.after_fetch=sleep(2.5)"

Each item is ``name[:scope]=action``; a scope (a consumer group, or a saga
name for ``saga.*``) narrows a point to that group. Actions:

``kill``
    SIGKILL this process: what ``kill -9`` or the OOM killer does.
``raise``
    raise ``FailpointError`` at the point.
``sleep(<seconds>)``
    wait there (asynchronously: the rest of the process keeps running).
``stall(<seconds>)``
    block the whole event loop there (a process stop, a long GC pause).

Unset, every point costs one truth test of a module-level dict: call sites
read ``if ACTIVE: await hit(name, scope)``, and ``ACTIVE`` is empty. A test
checks that every call site is guarded that way and names a point listed in
``POINTS``.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time

import attrs

from choreo.errors import ChoreoError, ConfigurationError

__all__ = ("ACTIVE", "POINTS", "Failpoint", "FailpointError", "configure", "hit", "parse")

#: Every point placed in the library, with where it sits.
POINTS: dict[str, str] = {
    "worker.after_fetch": "deliveries fetched (pending with this consumer), not yet handed to handlers",
    "dispatcher.before_commit": "the handler has run (its side effects happened); nothing committed yet",
    "dispatcher.after_commit": "the commit (effects, ack, dedupe record) is durable; the caller not yet told",
    "saga.before_state_write": "a saga's start or resume is computed; its record and commands not yet written",
    "saga.after_state_write": "a saga's start or resume record and commands are written",
    "relay.after_publish": "an outbox batch is published to the broker; its rows not yet deleted",
}

_ITEM = re.compile(r"^(?P<name>[a-z_.]+)(?::(?P<scope>[A-Za-z0-9._:\-]+))?=(?P<action>kill|raise|"
                   r"(?P<timed>sleep|stall)\((?P<seconds>\d+(?:\.\d+)?)\))$")


class FailpointError(ChoreoError, RuntimeError):
    """Raised by a failpoint whose action is ``raise``."""


@attrs.frozen
class Failpoint:
    name: str
    scope: str | None
    action: str
    seconds: float = 0.0


def parse(spec: str) -> dict[str, Failpoint]:
    """Parse a ``CHOREO_FAILPOINTS`` value into points keyed ``name`` or ``name:scope``.

    Raises:
        ConfigurationError: an item that does not parse or names an unknown point.
    """
    points: dict[str, Failpoint] = {}
    for item in filter(None, (part.strip() for part in re.split(r"[;,]", spec))):
        match = _ITEM.match(item)
        if match is None:
            raise ConfigurationError(f"CHOREO_FAILPOINTS item {item!r}: use name[:scope]=kill|raise|sleep(s)|stall(s)")
        name, scope = match["name"], match["scope"]
        if name not in POINTS:
            raise ConfigurationError(f"CHOREO_FAILPOINTS names unknown point {name!r}; known: {', '.join(POINTS)}")
        action = match["timed"] or match["action"]
        point = Failpoint(name, scope, action, float(match["seconds"] or 0.0))
        points[name if scope is None else f"{name}:{scope}"] = point
    return points


#: The armed points; empty unless ``CHOREO_FAILPOINTS`` was set at import.
ACTIVE: dict[str, Failpoint] = parse(os.environ.get("CHOREO_FAILPOINTS", ""))


def configure(spec: str) -> None:
    """Re-arm the points in this process (tests that stay in-process).

    ``ACTIVE`` is changed in place, so call sites that imported it see it.
    """
    points = parse(spec)
    ACTIVE.clear()
    ACTIVE.update(points)


async def hit(name: str, scope: str | None = None) -> None:
    """Trigger point ``name`` (for ``scope``) if it is armed.

    Raises:
        FailpointError: the point's action is ``raise``.
    """
    point = ACTIVE.get(f"{name}:{scope}") if scope is not None else None
    if point is None:
        point = ACTIVE.get(name)
    if point is None:
        return
    if point.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(10)  # the signal is asynchronous; never run past the point
    elif point.action == "raise":
        raise FailpointError(f"failpoint {name} fired")
    elif point.action == "sleep":
        await asyncio.sleep(point.seconds)
    else:
        time.sleep(point.seconds)
