"""Prometheus metrics for the sync cycles, on a registry of their own.

A private ``CollectorRegistry`` (not prometheus_client's global one) means two
``Metrics`` never collide: tests build as many as they like, and nothing leaks
between them. The cycle always gets a ``Metrics``; when ``[metrics] listen`` is
absent it simply is never served.

Every series carries a ``sync`` label, so :meth:`Metrics.forget` can drop a sync
that a reload removed instead of exporting its last values forever.

The gauges tell the truth in both directions (DESIGN.md "Operating it"): every
configured sync has its series from start-up (:meth:`Metrics.restore`, from the state
database), backlog is measured after failed cycles too, and the age of the data is
the timestamp of the last successful cycle, which an idle healthy sync keeps fresh.
There is deliberately no "watermark lag": the watermark of an idle table stands
still while the clock moves on, so such a gauge grows on a healthy sync.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.metrics import MetricWrapperBase

from syncd.values import SyncState

if TYPE_CHECKING:
    from syncd.config import SyncConfig
    from syncd.values import SyncStatus

__all__ = ["STATES", "Metrics", "MetricsServer", "parse_listen", "schedule_seconds"]

# The `state` label's values: the stored states, plus config_error (a sync stopped by
# HTTP 405 until a reload; the state database records it as failing).
STATES = tuple(state for state in SyncState if state is not SyncState.RUNNING)

# One request to the API: tens of milliseconds when healthy, up to the 30 s timeout.
_PUSH_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# One cycle: from an idle poll (milliseconds) to a backfill or reconcile (minutes).
_CYCLE_BUCKETS = (0.05, 0.25, 1, 5, 15, 60, 300, 900, 3600)
# How far ahead a cron schedule is scanned for its longest gap: a week and a day covers
# weekends; the fire cap bounds the scan of an every-minute schedule (~0.1 s).
_CRON_HORIZON = timedelta(days=8)
_CRON_MAX_FIRES = 12_000


class Metrics:
    """The metric families, with one method per thing the sync cycle observes."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = CollectorRegistry() if registry is None else registry
        r = self.registry
        self._rows_read = Counter(
            "syncd_rows_read", "Source rows read by the sync.", ["sync"], registry=r
        )
        self._records_sent = Counter(
            "syncd_records_sent",
            "Records the API acknowledged (statuscode 0).",
            ["sync"],
            registry=r,
        )
        self._unchanged = Counter(
            "syncd_unchanged_skipped",
            "Rows not sent because their mapped payload equals the last one acknowledged.",
            ["sync"],
            registry=r,
        )
        self._dead_letters = Counter(
            "syncd_dead_letters",
            "Records dead-lettered, by local validation or by the API rejecting them.",
            ["sync"],
            registry=r,
        )
        self._pushes = Counter(
            "syncd_pushes",
            "Requests to the Add-contacts API, by HTTP status and API code "
            '("" when there was none, e.g. a network error).',
            ["sync", "http_status", "api_code"],
            registry=r,
        )
        self._push_seconds = Histogram(
            "syncd_push_duration_seconds",
            "Duration of one request to the Add-contacts API.",
            ["sync"],
            buckets=_PUSH_BUCKETS,
            registry=r,
        )
        self._cycle_seconds = Histogram(
            "syncd_cycle_duration_seconds",
            "Duration of one sync cycle: read, map, push, commit.",
            ["sync"],
            buckets=_CYCLE_BUCKETS,
            registry=r,
        )
        self._cycles = Counter(
            "syncd_cycles",
            "Sync cycles run, by outcome (ok, failed).",
            ["sync", "outcome"],
            registry=r,
        )
        self._backlog = Gauge(
            "syncd_backlog_rows",
            "Source rows beyond the watermark, not yet pushed; measured after every cycle "
            "the source answered, failed ones included. Absent until first measured.",
            ["sync"],
            registry=r,
        )
        self._last_success = Gauge(
            "syncd_last_success_timestamp_seconds",
            "Unix time the sync's last successful cycle ended: the data is at most this old "
            "(plus the sync's settle). Absent before the first success.",
            ["sync"],
            registry=r,
        )
        self._open_dead_letters = Gauge(
            "syncd_dead_letters_open",
            "Dead letters not resolved yet (neither delivered since nor discarded).",
            ["sync"],
            registry=r,
        )
        self._schedule = Gauge(
            "syncd_schedule_interval_seconds",
            "The longest time between two scheduled cycles of the sync: its interval, "
            "or for a cron schedule the longest gap between runs in the next 8 days.",
            ["sync"],
            registry=r,
        )
        self._state = Gauge(
            "syncd_sync_state",
            f"1 for the sync's current state, 0 for the others ({', '.join(STATES)}).",
            ["sync", "state"],
            registry=r,
        )
        self._families: tuple[MetricWrapperBase, ...] = (
            self._rows_read,
            self._records_sent,
            self._unchanged,
            self._dead_letters,
            self._pushes,
            self._push_seconds,
            self._cycle_seconds,
            self._cycles,
            self._backlog,
            self._last_success,
            self._open_dead_letters,
            self._schedule,
            self._state,
        )
        Info("syncd_build", "The running syncd's version (value 1).", registry=r).info({"version": _version()})
        # The registry is private, so prometheus_client's default collectors are not on it.
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
        PlatformCollector(registry=r)  # python_info
        GCCollector(registry=r)  # python_gc_*

    def rows_read(self, sync: str, n: int) -> None:
        self._rows_read.labels(sync).inc(n)

    def records_sent(self, sync: str, n: int) -> None:
        """Acknowledged records (the API said statuscode 0 for their batch)."""
        self._records_sent.labels(sync).inc(n)

    def unchanged_skipped(self, sync: str, n: int) -> None:
        self._unchanged.labels(sync).inc(n)

    def dead_lettered(self, sync: str, n: int) -> None:
        self._dead_letters.labels(sync).inc(n)

    def push(self, sync: str, http_status: int | None, api_code: int | None, seconds: float) -> None:
        """One request. None (no response, no code in the body) becomes the empty
        label value, which Prometheus treats as "label absent"."""
        status = "" if http_status is None else str(http_status)
        code = "" if api_code is None else str(api_code)
        self._pushes.labels(sync, status, code).inc()
        self._push_seconds.labels(sync).observe(seconds)

    def cycle(self, sync: str, seconds: float, outcome: str) -> None:
        self._cycles.labels(sync, outcome).inc()
        self._cycle_seconds.labels(sync).observe(seconds)

    def set_backlog(self, sync: str, rows: int | None) -> None:
        """None removes the series: an absent series reads as "unknown", where 0
        would read as "caught up"."""
        _set_or_remove(self._backlog, sync, rows)

    def set_last_success(self, sync: str, when: datetime | None) -> None:
        _set_or_remove(self._last_success, sync, None if when is None else when.timestamp())

    def set_open_dead_letters(self, sync: str, count: int) -> None:
        self._open_dead_letters.labels(sync).set(count)

    def set_schedule(self, sync: SyncConfig) -> None:
        self._schedule.labels(sync.name).set(schedule_seconds(sync))

    def restore(self, stored: Iterable[SyncStatus], syncs: Iterable[SyncConfig]) -> None:
        """Give each of ``syncs`` its series before its first cycle ends: the schedule
        from its config, counters at 0 (so the first increase shows as a rate), and
        the gauges of its row in the state database (``stored``, as
        `StateStore.status()` reads them; a sync without a row has none yet)."""
        rows = {row.name: row for row in stored}
        for sync in syncs:
            self.set_schedule(sync)
            for family in (
                self._rows_read,
                self._records_sent,
                self._unchanged,
                self._dead_letters,
                self._push_seconds,
                self._cycle_seconds,
            ):
                family.labels(sync.name)
            for outcome in ("ok", "failed"):
                self._cycles.labels(sync.name, outcome)
            if sync.name in rows:
                self.show_stored(rows[sync.name])

    def show_stored(self, row: SyncStatus) -> None:
        """State, backlog, last success and open dead letters as the state database has
        them. A state this module does not know (a newer state database) leaves that
        gauge as it is rather than failing."""
        if row.state in STATES:
            self.set_state(row.name, row.state)
        self.set_backlog(row.name, row.backlog)
        self.set_last_success(row.name, row.last_success_at)
        self.set_open_dead_letters(row.name, row.dead_letters)

    def set_state(self, sync: str, state: SyncState) -> None:
        """One series per possible state, 1 for the current one: alerts can use
        ``syncd_sync_state{state="auth_error"} == 1`` without knowing the others."""
        if state not in STATES:
            raise ValueError(f"unknown sync state {state!r}; expected one of {', '.join(STATES)}")
        for each in STATES:
            self._state.labels(sync, each).set(1 if each == state else 0)

    def forget(self, sync: str) -> None:
        """Drop every series of ``sync`` (it was removed from the config)."""
        for family in self._families:
            _remove_sync(family, sync)

    def serve(self, listen: str) -> MetricsServer:
        """Serve ``/metrics`` on ``listen`` from a daemon thread.

        A port that is already taken raises OSError here, at startup, rather than
        leaving the daemon running without the metrics it was configured to export.
        """
        host, port = parse_listen(listen)
        server, thread = start_http_server(port, host, registry=self.registry)
        return MetricsServer(server, thread)


class MetricsServer:
    """A running metrics endpoint; ``close()`` it on shutdown or before re-serving."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread

    @property
    def port(self) -> int:
        """The bound port (the real one when ``listen`` asked for port 0)."""
        return int(self._server.server_port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def parse_listen(listen: str) -> tuple[str, int]:
    """``"127.0.0.1:9464"``, ``"[::1]:9464"`` or ``":9464"`` (all interfaces) into
    (host, port)."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"metrics listen address must be HOST:PORT, not {listen!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"write an IPv6 address in brackets, like [::1]:9464, not {listen!r}")
    # No host: every IPv4 interface, prometheus_client's own default. Not "::", which
    # fails outright on hosts with IPv6 disabled; write [::]:9464 to get dual-stack.
    return host or "0.0.0.0", int(port_text)


def schedule_seconds(sync: SyncConfig) -> float:
    """The longest wait between two scheduled cycles of ``sync``, in seconds.

    What "no successful cycle for too long" is measured against: an alert can then
    say "three schedules" whether the sync runs every 30 s or on weekdays at 09:00.
    The interval's jitter (at most 10 %) is left out; alerts leave a margin anyway.
    """
    if sync.cron is None:
        assert sync.interval is not None  # the config fills in the default
        return sync.interval.total_seconds()
    from apscheduler.triggers.cron import CronTrigger

    trigger = CronTrigger.from_crontab(sync.cron, timezone=UTC)
    now = datetime.now(UTC)
    end = now + _CRON_HORIZON
    fire = trigger.get_next_fire_time(None, now)
    longest = 0.0
    for _ in range(_CRON_MAX_FIRES):
        following = None if fire is None else trigger.get_next_fire_time(fire, fire)
        if fire is None or following is None:
            break
        longest = max(longest, (following - fire).total_seconds())
        if following > end:  # the gap that crosses the horizon still counts (a monthly cron)
            break
        fire = following
    return longest or _CRON_HORIZON.total_seconds()


def _version() -> str:
    try:
        return version("syncd")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def _set_or_remove(gauge: Gauge, sync: str, value: float | None) -> None:
    if value is not None:
        gauge.labels(sync).set(value)
        return
    try:
        gauge.remove(sync)
    except KeyError:  # not there: older prometheus-client releases raise, newer ones ignore it
        pass


def _remove_sync(family: MetricWrapperBase, sync: str) -> None:
    """Remove each child of ``family`` labelled ``sync=<sync>``.

    Found through collect(), public API on every prometheus-client we allow, rather
    than remove_by_labels(), which only recent releases have. Bucket samples carry
    an extra "le" label and are skipped; the histogram's _sum and _count name the child.
    """
    children = set()
    for metric in family.collect():
        for sample in metric.samples:
            if sample.labels.get("sync") == sync and "le" not in sample.labels:
                children.add(tuple(sample.labels.values()))
    for labels in children:
        family.remove(*labels)
