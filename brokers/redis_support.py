"""Waiting on Redis: the blocking read for new entries, and backoff with
bounded logging while Redis is unreachable, loading or busy."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

__all__ = ("Outage", "wait_for_entries")

#: Seconds between repeated log lines about the same condition.
_LOG_EVERY = 30.0
_MAX_BACKOFF = 2.0


async def wait_for_entries(reader: Any, tails: dict[str, str], seconds: float) -> None:
    """Block until any stream gets an entry past its tail, or ``seconds`` pass.

    One XREAD over all the streams on the blocking connection pool; the reply
    only wakes the caller, which then reads through its consumer groups.
    """
    block = int(seconds * 1000)
    if block < 1 or not tails:
        return
    # BLOCK is enforced by Redis; the outer timeout catches a dead connection.
    await asyncio.wait_for(reader.xread(tails, count=1, block=block), seconds + 5.0)


class Outage:
    """Backoff and log rate limiting for one broker's connection trouble."""

    def __init__(self, log: logging.Logger, url: str) -> None:
        self._log = log
        self._url = url
        self._backoff = 0.0
        self._since: float | None = None
        self._logged = 0.0
        self._nogroup_logged = -_LOG_EVERY
        self._nogroup_quiet = 0

    async def pause(self, exc: BaseException, budget: float) -> None:
        """Record a failed call and sleep a growing backoff (at most ``budget``,
        but never zero, so a caller retrying at once cannot spin)."""
        now = time.monotonic()
        if self._since is None:
            self._since = self._logged = now
            self._log.warning("Redis at %s is unavailable (%s: %s); retrying with backoff",
                              self._url, type(exc).__name__, exc)
        elif now - self._logged >= _LOG_EVERY:
            self._logged = now
            self._log.warning("Redis at %s still unavailable after %.0f s (%s)",
                              self._url, now - self._since, type(exc).__name__)
        self._backoff = min(_MAX_BACKOFF, max(0.05, self._backoff * 2))
        await asyncio.sleep(min(self._backoff, max(budget, 0.05)))

    def ended(self) -> None:
        """Record a successful call; log the recovery once."""
        if self._since is not None:
            self._log.warning("Redis at %s is available again after %.1f s", self._url, time.monotonic() - self._since)
            self._since = None
        self._backoff = 0.0

    def note_nogroup(self, what: str) -> None:
        """Log recreated consumer groups, at most once per interval."""
        now = time.monotonic()
        if now - self._nogroup_logged < _LOG_EVERY:
            self._nogroup_quiet += 1
            return
        more = f" ({self._nogroup_quiet} more since the last report)" if self._nogroup_quiet else ""
        self._nogroup_logged, self._nogroup_quiet = now, 0
        self._log.warning("consumer groups were missing (stream deleted, group destroyed or FLUSHALL?); "
                          "recreated on %s%s", what, more)
