"""The coordinators defined so far, for ``SagaTestHarness()`` with no apps.

The seed's harness needs no arguments: it runs "the apps defined so far".
This is the one place that remembers them, weakly (it keeps nothing alive)
and for that alone: apps find their own coordinator in ``app.extensions``,
and runtimes find plug-ins through lifespan hooks, never through here.
"""

from __future__ import annotations

import itertools
import weakref

__all__ = ("newest_first", "remember")

# Values are SagaCoordinators; typed loosely so that this module needs not
# import the coordinator that calls it.
_live: weakref.WeakValueDictionary[int, object] = weakref.WeakValueDictionary()
_serials = itertools.count()


def remember(coordinator: object) -> None:
    """Note a new coordinator (called by its constructor)."""
    _live[next(_serials)] = coordinator


def newest_first() -> list[object]:
    """Every coordinator still alive, the most recently created first."""
    found = [_live.get(serial) for serial in sorted(_live.keys(), reverse=True)]
    return [coordinator for coordinator in found if coordinator is not None]
