"""The reliability lab's app: ``lab.job`` -> ``lab.done``, one committed effect per job.

The handler's only effect is the ``lab.done`` event it emits (committed with
the ack, counted by ``tests.ledger``). What a job asks for, in its data:

``job``
    its key in the ledger (required);
``ledger``
    a file to append ``start <job> <pid>`` to when the body begins (executions);
``seconds``
    sleep that long before returning;
``slow_once``
    a file: sleep ``seconds`` only if it does not exist yet, creating it (so a
    redelivered job runs fast);
``crash``
    SIGKILL this process at the end of the handler, after ``seconds`` (a
    poison message that takes the worker down every time);
``fail``
    raise (a poison message the handler rejects every time);
``fail_until``
    a file: raise while it does not exist (a cause fixed later).
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

from choreo import App
from tests.apps import append_line

app = App("lab")


class LabFailure(Exception):
    """A job that asked to fail."""


@app.on_event("lab.job", retries=0)
@app.emits("lab.done")
async def work(data: dict[str, Any]) -> dict[str, Any]:
    if data.get("ledger"):
        append_line(data["ledger"], f"start {data['job']} {os.getpid()}")
    if data.get("fail") or (data.get("fail_until") and not Path(data["fail_until"]).exists()):
        raise LabFailure(f"job {data['job']} fails")
    seconds = float(data.get("seconds", 0.0))
    once = data.get("slow_once")
    if once:
        marker = Path(once)
        if marker.exists():
            seconds = 0.0
        else:
            marker.touch()
    if seconds:
        await asyncio.sleep(seconds)
    if data.get("crash"):
        os.kill(os.getpid(), signal.SIGKILL)
    return {"by": os.getpid()}
