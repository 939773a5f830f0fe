"""The two tricks the per-event path uses to build values and check names,
kept in one place with the measurements that justify them.

Both live here, below ``choreo``, because the brokers use them too and
``brokers`` never imports ``choreo``. Figures are nanoseconds per call on a
2-core machine, CPython 3.11, measured with ``timeit``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import attrs

__all__ = ("MAX_REMEMBERED", "remember", "slot_setters")

T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")


def slot_setters(cls: type[T]) -> tuple[Callable[[T, Any], None], ...]:
    """Each field's slot setter of the frozen, slotted attrs class ``cls``, in
    field order, for building instances without ``__init__``::

        instance = object.__new__(cls)
        set_a, set_b = slot_setters(cls)   # looked up once, at import
        set_a(instance, a)
        set_b(instance, b)

    Every event is built twice on its way through a worker (decoded, and each
    event its handler emits) and every delivery builds a ``Delivery`` and a
    ``Message`` per emitted event. attrs' generated ``__init__`` of a frozen
    class sets each field with ``object.__setattr__`` by name and runs the
    converters and factories: ``Message(...)`` costs 465 ns, ``Delivery(...)``
    630 ns, ``Event(...)`` 950 ns. Setting the slots through setters looked up
    once costs 345, 430 and 580 ns (the same setattr by name, done by hand:
    505 ns for a ``Message``): about 1.3 µs saved per handled event.

    The invariant the caller keeps: the values are exactly what ``__init__``
    would have stored, since no converter, validator, default or
    ``__attrs_post_init__`` runs. Use it only for classes with none of these,
    or with values already converted and checked (a decoded event).

    Raises:
        TypeError: ``cls`` is not a slotted attrs class (its fields would have
            no slot descriptors to set).
    """
    if not attrs.has(cls) or "__slots__" not in vars(cls):
        raise TypeError(f"{cls.__name__} is not a slotted attrs class")
    return tuple(getattr(cls, field.name).__set__ for field in attrs.fields(cls))


#: Entries a memo keeps at most, so a flood of distinct names cannot grow it
#: without bound (past it, new names are checked every time, still correctly).
MAX_REMEMBERED = 10_000


def remember(memo: dict[K, V], key: K, value: V) -> V:
    """Store ``memo[key] = value`` unless ``memo`` is full; return ``value``.

    Topic, group and event type names are checked (and quoted for the Redis
    commit header) for every message, but a system has few of them. The check
    is a regex ``fullmatch``: 140 ns for a topic, 280 ns for a dotted event
    type; quoting a name as JSON costs 90 ns. A hit in a plain dict
    costs 18 ns, so callers look the name up inline (``if name in memo``: a
    ``dict`` subclass or a method would cost 8-10 ns more per hit, and a hit is
    what happens almost always) and call this only after a miss, with the
    value computed from a name that passed its check: a refused name is never
    remembered, so it is refused again each time it is met.
    """
    if len(memo) < MAX_REMEMBERED:
        memo[key] = value
    return value
