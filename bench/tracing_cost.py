"""The cost of OpenTelemetry tracing per handled event, on the in-memory
chain, at several sampling ratios, against untraced in the same rounds.

    python bench/tracing_cost.py [--chains 20000] [--repeat 3] [--modes untraced,sdk,always,0.1,0.01]
    valgrind --tool=callgrind python bench/tracing_cost.py --chains 1500 --repeat 1 --modes always

The chain of ``chain_memory.py`` run by ``choreo.run`` (what ``choreo
worker`` runs), its root events published 500 at a time by concurrent
``publish()`` calls. Modes: ``untraced`` (no middleware), ``always``
(``TracingMiddleware`` on an SDK provider sampling every trace), and a
ratio such as ``0.1`` (``ParentBased(TraceIdRatioBased(0.1))``: a tenth
of the root publishes start a recorded trace, the other events follow
their root's decision through the ``traceparent`` flag), and ``sdk``: the
floor of any tracing middleware on this SDK, the same spans with the same
attributes started and ended on a provider sampling every trace, and
nothing else (no context made current, no ``traceparent`` written or read,
so no trace is joined up). Every provider
hands finished spans to a ``BatchSpanProcessor`` whose exporter drops them:
what is measured is tracing, not shipping spans.

Per round and mode it prints the process CPU time per handled event
(publishing included; three handled events per chain), and the median's
cost against untraced. Wall-clock time is noisy on a shared machine; CPU
time is less so, and instruction counts (run one mode at a time under
``valgrind --tool=callgrind`` at two sizes and subtract, so start-up
cancels out) not at all.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from chain_memory import chain_app, quiet  # this folder, run as a script

from choreo import run
from choreo.middleware import Middleware
from choreo.supervisor import WORKER_GC_THRESHOLD, tune_collector

PAYLOAD = {"order_id": "O-000000", "sku": "SKU-1", "quantity": 1, "note": "x" * 24}


def middleware(mode: str) -> tuple[list[Middleware], Callable[[], None]]:
    """The middleware of ``mode`` (see the module's docstring), and what
    stops it (the batch processor's thread)."""
    if mode == "untraced":
        return [], lambda: None
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, TraceIdRatioBased

    from choreo.otel import TracingMiddleware

    class Drop(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    sampler = ALWAYS_ON if mode in ("always", "sdk") else ParentBased(TraceIdRatioBased(float(mode)))
    provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(BatchSpanProcessor(Drop()))
    if mode == "sdk":
        return [SpansOnly(provider)], provider.shutdown
    return [TracingMiddleware(provider)], provider.shutdown


class SpansOnly(Middleware):
    """The ``sdk`` mode: a ``choreo.handle`` span per handled event and a
    ``choreo.publish`` span per published event, with the attributes
    ``TracingMiddleware`` gives them, and nothing else."""

    def __init__(self, provider: Any) -> None:
        from opentelemetry.trace import SpanKind

        self._start = provider.get_tracer("choreo").start_span
        self._consumer, self._producer = SpanKind.CONSUMER, SpanKind.PRODUCER

    def handling(self, broker: Any, route: Any, delivery: Any, event: Any) -> contextlib.AbstractContextManager[object]:
        attributes = {
            "messaging.system": "memory", "messaging.destination.name": route.event,
            "messaging.operation.type": "process", "messaging.operation.name": "handle",
            "messaging.operation": "process", "messaging.consumer.group.name": route.group,
            "messaging.message.id": event.id, "messaging.message.conversation_id": event.correlation_id,
        }
        return _Ending([self._start(f"choreo.handle {event.type}", kind=self._consumer, attributes=attributes)])

    def publishing(self, broker: Any, events: Sequence[Any]) -> contextlib.AbstractContextManager[object]:
        return _Ending([self._start(f"choreo.publish {event.type}", kind=self._producer, attributes={
            "messaging.system": "memory", "messaging.destination.name": event.type,
            "messaging.operation.type": "send", "messaging.operation.name": "publish", "messaging.operation": "publish",
            "messaging.message.id": event.id, "messaging.message.conversation_id": event.correlation_id,
        }) for event in events])


class _Ending:
    """Ends its spans on exit."""

    def __init__(self, spans: list[Any]) -> None:
        self._spans = spans

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        for span in self._spans:
            span.end()


async def chains(count: int, used: Sequence[Middleware]) -> None:
    async with run(chain_app(), broker="memory://", middleware=used) as runtime:
        for n in range(0, count, 500):
            await asyncio.gather(*(runtime.publish("bench.a", {**PAYLOAD, "n": m})
                                   for m in range(n, min(n + 500, count))))
        await quiet(runtime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chains", type=int, default=20_000, help="root events (each makes three hops)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds, modes alternating; medians reported")
    parser.add_argument("--modes", default="untraced,sdk,always,0.1,0.01",
                        help="comma-separated: untraced, sdk, always, or a sampling ratio")
    parser.add_argument("--gc-threshold", type=int, default=WORKER_GC_THRESHOLD,
                        help="collector threshold, as choreo worker sets it (0: Python's default)")
    args = parser.parse_args()
    modes = args.modes.split(",")
    for mode in modes:
        if mode not in ("untraced", "sdk", "always") and not 0 <= float(mode) <= 1:
            parser.error(f"a mode is untraced, sdk, always or a ratio between 0 and 1, not {mode!r}")
    tune_collector(args.gc_threshold)
    cpu: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(args.repeat):
        for mode in modes:
            used, close = middleware(mode)
            start = time.process_time()
            asyncio.run(chains(args.chains, used))
            cpu[mode].append((time.process_time() - start) / (args.chains * 3) * 1e6)
            close()
    print(f"{args.chains:,} chains of 3 hops on memory://, {args.repeat} round(s), medians; "
          f"gc threshold {gc.get_threshold()[0]}")
    base = statistics.median(cpu["untraced"]) if "untraced" in cpu else None
    for mode in modes:
        median = statistics.median(cpu[mode])
        against = "" if base is None or mode == "untraced" else \
            f"  cost +{median - base:.1f} us (+{(median / base - 1) * 100:.0f}%)"
        print(f"{mode:<9} CPU per handled event {median:6.1f} us{against}; per round: "
              + " / ".join(f"{c:.1f}" for c in cpu[mode]))


if __name__ == "__main__":
    main()
