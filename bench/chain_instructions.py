"""Instructions per handled event of the in-memory chain, counted by
callgrind: a figure that does not move with the machine's load.

    python bench/chain_instructions.py [--chains 1500] [--less 500]

Runs ``chain_memory.py``'s three contenders (the asyncio + JSON baseline, the
production path ``choreo.run``, the test harness ``run_apps``), each in a
fresh ``python`` under ``valgrind --tool=callgrind``, once with ``--chains``
and once with ``--less`` root events: the difference of the two totals,
divided by the difference in handled events (three per chain), is what one
handled event costs, start-up and import cancelled out. Prints each
contender's count and its ratio to the baseline's (instructions, so a lower
ratio is better; the events/s ratio of ``chain_memory.py`` is about its
inverse). Needs ``valgrind`` on PATH; takes a minute or two.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from chain_memory import run_baseline, run_harness, run_production  # this folder, run as a script

from choreo.supervisor import WORKER_GC_THRESHOLD, tune_collector

CONTENDERS = {
    "baseline asyncio.Queue + json": run_baseline,
    "production path (choreo.run)": run_production,
    "test harness (run_apps)": run_harness,
}


def count(name: str, chains: int) -> int:
    """Instructions of one whole run of ``name`` with ``chains`` root events."""
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/out", sys.executable,
             os.path.abspath(__file__), "--inner", name, "--chains", str(chains)],
            capture_output=True, text=True, check=False,
        )
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise SystemExit(f"{name} under callgrind failed:\n{done.stderr[-2000:]}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chains", type=int, default=1500, help="root events of the longer run")
    parser.add_argument("--less", type=int, default=500, help="root events of the shorter run")
    parser.add_argument("--inner", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        tune_collector(WORKER_GC_THRESHOLD)  # as choreo worker sets it, for every contender
        asyncio.run(CONTENDERS[args.inner](args.chains))
        return
    if args.chains <= args.less:
        parser.error("--chains must be more than --less")
    events = (args.chains - args.less) * 3
    print(f"instructions per handled event (callgrind), {args.chains:,} chains minus {args.less:,}")
    baseline = 0.0
    for name in CONTENDERS:
        per_event = (count(name, args.chains) - count(name, args.less)) / events
        baseline = baseline or per_event
        print(f"{name + ':':<31} {per_event:>9,.0f} instructions per event ({per_event / baseline:.2f}x the baseline)")


if __name__ == "__main__":
    main()
