"""A peer's publisher process for ``bench/peers.py``, run with the peers'
python:

    python -m bench.peer_apps.publisher PEER CHAINS TASKS PAYLOAD_JSON

Imports ``bench.peer_apps.<PEER>_app`` and says ``ready``; on the next line of
stdin publishes ``CHAINS`` root events through the app's ``publish`` from
``TASKS`` concurrent tasks (threads for Dramatiq, whose ``send`` blocks) and
prints the seconds it took. The same handshake as ``worker_process.go``, which
this interpreter cannot import (choreo is not installed here).
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import sys
import time


def main(peer: str, chains: int, tasks: int, payload: str) -> None:
    app = importlib.import_module(f"bench.peer_apps.{peer}_app")
    data = json.loads(payload)
    events = [{**data, "n": n} for n in range(chains)]
    payloads = [events[start::tasks] for start in range(min(tasks, chains))]
    print("ready", flush=True)
    sys.stdin.readline()
    start = time.perf_counter()
    done = app.publish(payloads)
    if inspect.isawaitable(done):
        asyncio.run(done)
    print(f"{time.perf_counter() - start:.3f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
