"""The cluster soak (catalogue T15 on Redis Cluster, T30) from pytest, marked
slow: ``python -m tests.soak_cluster --events N`` runs the same code; see
docs/reliability.md for the figures measured on this machine."""

from __future__ import annotations

import gc

import pytest

from tests.soak_cluster import soak

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.slow]


# After the master kill redis-py's cluster client drops the dead node's connection
# objects without closing them (a new slot map), and their ResourceWarnings
# surface at garbage collection, in whatever test runs then.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.timeout(3600)
async def test_cluster_soak_with_worker_kills_and_a_master_kill() -> None:
    """100k events on 3 masters and 3 replicas, a worker killed every ~2 s and
    one master killed: 0 missing, 0 double, 0 dead letters, every partition drained."""
    figures = await soak(100_000, seed=1, kill_every=2.0, batch=500, log=print)
    gc.collect()  # those connections go now, while the warnings are ignored
    print(figures.line())
    assert (figures.missing, figures.double, figures.dead_letters) == (0, 0, 0), figures.line()
    assert figures.kills >= 3 and figures.freezes == 1
