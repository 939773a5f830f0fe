"""The tricks the per-event path uses, kept in one place with the
measurements that justify them.

Two live here, below ``choreo``, because the brokers use them too and
``brokers`` never imports ``choreo``: ``slot_setters`` and ``remember``.
The others sit where they run and are listed here, each with its reason.
Figures are per call on a 2-core machine, CPython 3.11: nanoseconds or
microseconds with ``timeit`` (best of several rounds; on a busy machine,
so compare the pairs, not machines), instructions with callgrind.

* ``choreo.ids.new_event_id``: the first id of a millisecond draws 60
  random bits and the ids after it count up in the last 20, instead of 80
  fresh random bits and eight table lookups per id: 1.4 against 2.7 us.
* ``choreo.metrics.Metrics`` keeps the labelled children it has used:
  ``labels()`` checks and joins the label values under a lock on every
  call, 4.9 us per handled event (a counter and a histogram) and 2.0 us
  per published event, against 0.14 us for a hit in a dict.
* ``choreo.middleware.Entered`` enters and exits the ``handling`` and
  ``publishing`` context managers: 1.9 us for one manager against 10.9 us
  for the ``contextlib.ExitStack`` and guarding generator it replaced.
* ``choreo.otel``: the handling span is started with ``start_span`` and
  made current by a plain object (``_Current``) instead of the SDK's two
  generator-based context managers; the version-00 ``traceparent`` is read
  by ``_remote`` with one ``fullmatch`` (1.1 us, its ``SpanContext`` made
  only when asked for, 2.7 us with it, against 5.4 us for the propagator's
  regex and getter, which still reads every other form; ``timeit``, same
  process) and written by ``_carrier`` (5.1 against 6.4 us); an event of a
  trace sampled out upstream gets no span and passes its headers on as
  they came; the attributes a route's spans share are built once.
* ``choreo.events.with_headers`` copies an event for a traced root commit
  without re-running the id checks ``attrs.evolve`` would.
* ``choreo.middleware.Hooks`` binds each hook only of the middleware that
  override it: the test harness's recorder overrides ``on_publish`` alone
  and no longer pays a call to an empty ``on_handled`` (and a clock read)
  per handled event.
* ``brokers.memory_records.Topic.seqs``: the log's sequence numbers beside
  the log, so the search for a group's next entry is a ``bisect`` in C
  rather than one with ``key=``, which called back into Python about ten
  times per fetch and group.
* ``choreo.worker.Runtime._consume`` makes each delivery's task with
  ``asyncio.Task(coro, loop=loop)`` when the loop is asyncio's own without
  a task factory, skipping ``loop.create_task``'s Python frame (and
  ``asyncio.create_task``'s ``getpid()`` per call on Linux).
* ``choreo.worker.Runtime._consume`` yields twice after starting handlers,
  so that their first steps run and the commit batch they queue is written
  before its next fetch writes the wait for more: written first, that wait
  woke Redis while the handlers still ran, and an idle 3-hop chain on Redis
  took about a fifth longer at p50 (``bench/README.md``, "Idle latency").
* ``brokers.redis_lines.Line`` bounds an exchange (its write and its
  replies) with one ``asyncio.timeout`` instead of letting redis-py write
  under ``wait_for``, which on Python 3.11 is a task and a turn of the loop
  per write: idle 3-hop p50 2.1-2.3 ms before, 1.2-1.9 ms after
  (``bench/README.md``, "a write is not a task of its own").
* ``choreo.codec`` checks a decoded envelope's type name against the names
  seen before and its optional ids inline, before calling the full checks:
  61,400 instructions per ``decode_event`` of a 305-byte event down to
  58,400 (callgrind).
* ``choreo.dispatcher`` encodes a handler's emitted events in a loop: a
  list comprehension is a function call of its own on Python 3.11 (2,500
  instructions for one element); 265,600 to 263,500 instructions per
  handled event on the memory chain.
* ``brokers.memory_records.Entry`` is not frozen (see its docstring): one
  is made per message the memory broker takes.
* ``choreo.context.Context`` makes ``idempotency_key`` when it is first
  read, not per delivery: a ``headers`` lookup and an f-string that most
  handlers never use (``Context(...)`` 4,400 to 3,200 instructions).

Measured and not used: running a handler's coroutine eagerly
(``coro.send(None)`` in the consume loop, a task only if it suspends)
saved 19,000 of 275,000 instructions per handled event on the memory chain,
but on Python 3.11 the code run that way sees the consume loop as
``asyncio.current_task()``: an ``asyncio.timeout`` (the route's own
``timeout``) or a ``TaskGroup`` entered before the first suspension would
cancel the consume loop instead of the handler. A fixed pool of consumer
tasks fed by a queue keeps ``current_task`` right but lets context
variables a handler sets leak into the next delivery on its task, and an
idle pool task woken per delivery costs about what a new task does.
* Not used: msgspec's JSON decoder and encoder. Both are compiled, but
  neither keeps the wire format's rules alone (``choreo.codec``, "Why not
  msgspec"): a decoder that checks msgspec's result for dropped duplicate
  keys ran 52,000 instructions per event body against 46,500 for the
  stdlib scanner with its duplicate-key hook (msgspec alone: 12,100).
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
