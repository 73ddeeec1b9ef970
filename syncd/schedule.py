"""When a sync's cycles and reconciles run: its `interval` or `cron`, and its `reconcile`.

Plain arithmetic on clocks, asked by the daemon's loop for each sync ("when next?").
An interval is timed on the monotonic clock, so a wall-clock step never bunches or
skips cycles; a cron expression and the reconcile times are wall-clock times in UTC,
as the operator wrote them. APScheduler's `CronTrigger` computes the cron fire times
(its parser is the one `config.py` validates with); nothing else of APScheduler runs.
"""

from __future__ import annotations

import hashlib
import random
import time
from datetime import UTC, datetime, timedelta

from apscheduler.triggers.cron import CronTrigger

from syncd.config import SyncConfig

__all__ = ["RECONCILE_GRACE_S", "CycleSchedule", "ReconcileSchedule"]

RECONCILE_GRACE_S = 3600.0  # a reconcile due up to an hour ago (a long cycle held it up) still runs
MAX_JITTER_S = 30.0


class CycleSchedule:
    """`interval`, or the cron expression in UTC exactly as written.

    An interval's runs (after the one at start-up) fall on a grid offset by a phase taken
    from the sync's name, so syncs started together spread over the interval instead of
    all querying at the same moment, plus up to 10% jitter (max 30 s) per run. Runs
    that fall due while a cycle (or a reconcile) is running coalesce into the next grid
    point after it: a backfill longer than the interval goes on from its watermark.
    """

    def __init__(self, sync: SyncConfig) -> None:
        self._cron = CronTrigger.from_crontab(sync.cron, timezone=UTC) if sync.cron is not None else None
        self._interval = sync.interval.total_seconds() if sync.interval is not None else 0.0
        self._jitter = min(self._interval * 0.1, MAX_JITTER_S)
        self._grid = time.monotonic() + _fraction(sync.name) * self._interval

    def first(self, *, run_now: bool) -> float:
        """The monotonic time of the first run: now, or the first regular one."""
        return time.monotonic() if run_now else self.next()

    def next(self) -> float:
        """The monotonic time of the next regular run after now."""
        now = time.monotonic()
        if self._cron is not None:
            return now + _seconds_until_next(self._cron)
        if self._grid <= now:
            self._grid += (int((now - self._grid) / self._interval) + 1) * self._interval
        return self._grid + random.uniform(0, self._jitter)


class ReconcileSchedule:
    """None for "off". "hourly" and "daily" are clock times, not intervals from start, so
    frequent restarts never postpone a reconcile forever; the minute comes from the sync's
    name, so many syncs do not all start their full pass at :00."""

    def __init__(self, trigger: CronTrigger) -> None:
        self._trigger = trigger

    @classmethod
    def of(cls, sync: SyncConfig) -> ReconcileSchedule | None:
        if sync.reconcile == "off":
            return None
        minute = int.from_bytes(hashlib.sha256(sync.name.encode()).digest()[:2], "big") % 60
        if sync.reconcile == "hourly":
            return cls(CronTrigger(minute=minute, timezone=UTC))
        if sync.reconcile == "daily":
            return cls(CronTrigger(hour=3, minute=minute, timezone=UTC))
        return cls(CronTrigger.from_crontab(sync.reconcile, timezone=UTC))

    def next_after(self, moment: datetime) -> datetime | None:
        """The first fire time strictly after `moment` (UTC); None if there is none."""
        fire: datetime | None = self._trigger.get_next_fire_time(None, moment + timedelta(microseconds=1))
        return fire


def _seconds_until_next(trigger: CronTrigger) -> float:
    now = datetime.now(UTC)
    fire: datetime | None = trigger.get_next_fire_time(None, now + timedelta(microseconds=1))  # untyped library
    if fire is None:  # an expression that never fires again (a date long past)
        return float("inf")
    return max((fire - now).total_seconds(), 0.0)


def _fraction(name: str) -> float:
    """A number in [0, 1) that depends only on `name`: where in a period a sync's runs fall."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:2], "big") / 65536
