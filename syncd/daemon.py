"""`syncd run`: schedule every sync, notify systemd, drain on SIGTERM, reload on SIGHUP.

This module only schedules, handles signals and notifies systemd; what a cycle does
lives in `syncd.cycle`, what the config means in `syncd.config`.

Threads and who owns what:
- The **main thread** owns the control loop. Signal handlers only set flags; Python
  also writes the signal number to a socket (`signal.set_wakeup_fd`) that the loop
  waits on, so a signal wakes it at once without the handler taking any lock (a
  handler calling `threading.Event.set()` can deadlock if it interrupts the main
  thread inside that Event's own lock). The loop reloads, drains, pings the watchdog
  and writes `STATUS=`.
- APScheduler's `BackgroundScheduler` thread only dispatches jobs to a thread pool
  sized so that every job can run at once: one slow sync never waits for another.
- A per-sync lock keeps a sync's cycle and its reconcile apart. A cycle that finds
  the lock taken *skips* (the reconcile is pushing everything anyway, and the next
  interval comes soon); a reconcile *waits* for the cycle (reconciles are hourly or
  daily, and skipping one would drop the safety net for a whole period).

"Scheduler alive", which gates `WATCHDOG=1`: the scheduler is in its running state
*and* a heartbeat job, dispatched by the scheduler thread onto its own one-thread
executor, has run within the last few heartbeat periods. That proves the scheduler
loop still wakes up and dispatches, not just that the object exists. It deliberately
does not require sync cycles to finish: a backfill may take hours, and a restart
would only start it over. A hung cycle shows in `syncd status` and the metrics.

Stop (SIGTERM/SIGINT): `STOPPING=1`, the scheduler is paused, and every runner's
`should_stop()` turns true, so cycles read no new batch while the batches already on
the wire finish and commit. After `drain_timeout` the daemon exits 0 regardless: a
thread cannot be killed, so a cycle still running then is abandoned (`os._exit`),
which costs only its unacknowledged batches being sent again by the next run.

Reload (SIGHUP) applies live: syncs added, removed or changed (mapping, schedule,
table, anything; a changed sync gets a new runner, swapped in between cycles, and
runs at once), sources (syncs using a changed source are rebuilt), the `[api]`
batching, concurrency, retry and rate settings, `[log]` and `drain_timeout`. It does
not apply `RESTART_KEYS` (the state database, the metrics socket, the API's url,
credentials and timeout): those hold connections, a listening socket or secrets (systemd
credentials are fixed for the life of the process anyway). The daemon logs
`reload_needs_restart` naming those keys and keeps running on their old values.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from syncd.config import Config, ConfigError, SyncConfig, config_warnings, load_config
from syncd.cycle import CycleReport, SyncRunner
from syncd.logs import configure_logging, get_logger
from syncd.metrics import MetricsServer
from syncd.notify import SystemdNotifier
from syncd.runtime import Runtime, open_source
from syncd.source import Source
from syncd.values import CycleKind

__all__ = ["run_daemon"]

log = get_logger(__name__)

PROGRESS_EVERY_S = 10.0  # a long cycle logs `progress` this often
MAX_LOOP_WAIT_S = 1.0  # the main loop wakes at least this often, for STATUS and housekeeping
HEARTBEAT_MAX_S = 5.0  # heartbeat period without a watchdog (and its upper bound with one)
HEARTBEAT_MISSES = 3  # the scheduler counts as stalled after this many missed heartbeats
RECONCILE_GRACE_S = 3600  # a reconcile dispatched up to an hour late still runs
SUMMARY_EVERY_S = 3600.0  # an info line on how the syncs stand: idle cycles themselves log at debug
MIGRATION_EXTEND_S = 10.0  # while migrating, ask systemd for 30 s more every 10 s
STOP_TIMEOUT_ENV = "SYNCD_STOP_TIMEOUT"  # the unit's TimeoutStopSec, in seconds (set by syncd.service)
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def run_daemon(config_path: str | os.PathLike[str]) -> int:
    """Run until SIGTERM/SIGINT; 0 after a clean drain, 1 when startup fails.

    A config that cannot be loaded raises `ConfigError`, which the CLI turns into its
    message on stderr and exit code 2.
    """
    path = Path(config_path)
    config = load_config(path)
    configure_logging(config.log.level, config.log.format)
    _log_config_warnings(path, config)
    _warn_if_drain_outlasts_stop(config)
    daemon = Daemon(path, config)
    return daemon.run()


def _log_config_warnings(path: Path, config: Config) -> None:
    for warning in config_warnings(path, config):
        log.warning("config_warning", problem=warning)


def _warn_if_drain_outlasts_stop(config: Config, environ: Mapping[str, str] = os.environ) -> None:
    """Warn when `drain_timeout` does not fit in the unit's stop timeout.

    systemd does not tell a service its TimeoutStopSec=; the shipped unit passes the
    same number in $SYNCD_STOP_TIMEOUT. A drain still running when it runs out is
    SIGKILLed: nothing is lost (unacknowledged batches are sent again), but the
    drain_timeout the config promises does not hold.
    """
    value = environ.get(STOP_TIMEOUT_ENV)
    if not value:
        return
    try:
        stop_s = float(value)
    except ValueError:
        log.warning("config_warning", problem=f"${STOP_TIMEOUT_ENV}={value!r} is not a number of seconds; ignored")
        return
    drain_s = config.drain_timeout.total_seconds()
    if drain_s >= stop_s:
        log.warning(
            "drain_timeout_exceeds_stop_timeout",
            drain_timeout_s=drain_s,
            stop_timeout_s=stop_s,
            action="lower drain_timeout, or raise TimeoutStopSec= and SYNCD_STOP_TIMEOUT= together in a drop-in",
        )


def _version() -> str:
    try:
        return importlib.metadata.version("syncd")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


class _ExpectedOverlap(logging.Filter):
    """Drops APScheduler's "skipped: maximum number of running instances reached".

    During a backfill longer than the interval it fires every interval, yet it is the
    intended behaviour (`max_instances=1`, the running cycle continues from its
    watermark); as a warning it would bury the warnings that matter.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "maximum number of running instances" not in str(record.msg)


# ---------------------------------------------------------------------------- signals


class Signals:
    """Flags set by signal handlers, and a socket the main loop can wait on.

    Handlers run in the main thread between bytecodes, possibly in the middle of a
    log write or a lock; so they assign an attribute and nothing else. The wakeup
    byte is written by the interpreter itself (`set_wakeup_fd`), at C level.
    """

    def __init__(self) -> None:
        self.stop_requested = False
        self.reloads_requested = 0  # a counter, so a SIGHUP during a reload is not lost
        self._reloads_seen = 0
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        self._previous_fd: int | None = None

    def install(self) -> None:
        for signum in _SIGNALS:
            signal.signal(signum, self._handle)
        self._previous_fd = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)

    def uninstall(self) -> None:
        for signum in _SIGNALS:
            signal.signal(signum, signal.SIG_DFL if signum != signal.SIGINT else signal.default_int_handler)
        signal.set_wakeup_fd(-1 if self._previous_fd is None else self._previous_fd)
        self._reader.close()
        self._writer.close()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self.reloads_requested += 1
        else:
            self.stop_requested = True

    def should_stop(self) -> bool:
        """Handed to every runner: stop reading new batches once a stop was asked for."""
        return self.stop_requested

    def take_reload(self) -> bool:
        """Whether a reload was requested since the last call (several count as one)."""
        requested = self.reloads_requested
        if requested == self._reloads_seen:
            return False
        self._reloads_seen = requested
        return True

    def wait(self, timeout: float) -> None:
        """Sleep up to `timeout`, returning early when a signal arrives."""
        try:
            select.select([self._reader], [], [], max(timeout, 0.0))
            while self._reader.recv(64):
                pass
        except (BlockingIOError, InterruptedError):
            pass


# ---------------------------------------------------------------------------- progress


@dataclass
class _Progress:
    kind: str
    started: float
    last_logged: float
    remaining_at: tuple[int, int] | None = None  # (rows_read, backlog) when first measured


class ProgressLog:
    """Rate-limited `progress` events for long cycles, fed by the runners' `on_progress`.

    The runner calls back after every committed batch; logging each would flood the
    journal during a backfill, so a sync logs at most once per `every` seconds, and
    not at all for a cycle shorter than that. The backlog is counted once per cycle
    (at its first progress line) and then extrapolated: counting every time would
    cost a query per line on a large table.
    """

    def __init__(self, runners: Callable[[], dict[str, SyncRunner]], every: float = PROGRESS_EVERY_S) -> None:
        self._runners = runners
        self._every = every
        self._lock = threading.Lock()
        self._cycles: dict[str, _Progress] = {}

    def begin(self, sync: str, kind: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._cycles[sync] = _Progress(kind=kind, started=now, last_logged=now)

    def __call__(self, report: CycleReport) -> None:
        now = time.monotonic()
        with self._lock:
            progress = self._cycles.get(report.sync)
            if progress is None or now - progress.last_logged < self._every:
                return
            progress.last_logged = now
        elapsed = max(now - progress.started, 1e-6)
        rate = report.rows_read / elapsed
        fields: dict[str, Any] = {
            "sync": report.sync,
            "kind": progress.kind,
            "rows_done": report.rows_read,
            "sent": report.sent,
            "rows_per_s": round(rate, 1),
            "elapsed_s": round(elapsed, 1),
        }
        remaining = self._remaining(report, progress)
        if remaining is not None:
            fields["remaining"] = remaining
            fields["eta_s"] = round(remaining / rate) if rate > 0 else None
        log.info("progress", **fields)

    def _remaining(self, report: CycleReport, progress: _Progress) -> int | None:
        if progress.kind != CycleKind.SYNC:
            return None  # a reconcile reads the whole table; its size is not a backlog
        if progress.remaining_at is None:
            runner = self._runners().get(report.sync)
            if runner is None:
                return None
            try:
                backlog = runner.reader.backlog(runner.state.cursor(report.sync))
            except Exception:  # progress is never worth failing a cycle
                return None
            progress.remaining_at = (report.rows_read, backlog)
        rows_then, backlog_then = progress.remaining_at
        return max(backlog_then - (report.rows_read - rows_then), 0)


# ---------------------------------------------------------------------------- schedules


def sync_trigger(sync: SyncConfig) -> BaseTrigger:
    """`interval` with up to 10% jitter (max 30 s), so syncs started together drift apart;
    or the cron expression, in UTC, exactly as written."""
    if sync.cron is not None:
        return CronTrigger.from_crontab(sync.cron, timezone=UTC)
    assert sync.interval is not None  # the config fills in the default
    seconds = sync.interval.total_seconds()
    return IntervalTrigger(seconds=seconds, jitter=min(seconds * 0.1, 30.0), timezone=UTC)


def reconcile_trigger(sync: SyncConfig) -> BaseTrigger | None:
    """None for "off". "hourly" and "daily" are clock times, not intervals from start,
    so frequent restarts never postpone a reconcile forever; the minute comes from the
    sync's name, so many syncs do not all start their full pass at :00."""
    if sync.reconcile == "off":
        return None
    minute = int.from_bytes(hashlib.sha256(sync.name.encode()).digest()[:2], "big") % 60
    if sync.reconcile == "hourly":
        return CronTrigger(minute=minute, timezone=UTC)
    if sync.reconcile == "daily":
        return CronTrigger(hour=3, minute=minute, timezone=UTC)
    return CronTrigger.from_crontab(sync.reconcile, timezone=UTC)


def sync_misfire_grace(sync: SyncConfig) -> int:
    """A cycle dispatched late still runs within one interval (at least 30 s); later than
    that the next regular run is just as good."""
    if sync.interval is None:
        return 60
    return max(30, int(sync.interval.total_seconds()))


def jobs_needed(config: Config) -> int:
    return sum(1 + (sync.reconcile != "off") for sync in config.syncs)


# ---------------------------------------------------------------------------- reload


# What a reload does not apply (the module docstring says why): a whole section, or one key of it.
RESTART_KEYS = ("state", "metrics.listen", "api.url", "api.token", "api.token_file", "api.timeout_s")


def effective_config(running: Config, loaded: Config) -> tuple[Config, list[str]]:
    """`loaded` with the RESTART_KEYS kept at their running values, and the keys of those
    that differ (the operator must restart to apply them)."""
    needs_restart = []
    kept: dict[str, dict[str, Any]] = {}  # section -> {key: running value}; "" for the whole section
    for restart_key in RESTART_KEYS:
        section, _, key = restart_key.partition(".")
        was, now = getattr(running, section), getattr(loaded, section)
        if key:
            was, now = getattr(was, key), getattr(now, key)
        if was != now:
            needs_restart.append(restart_key)
        kept.setdefault(section, {})[key] = was
    update = {
        section: values[""] if "" in values else getattr(loaded, section).model_copy(update=values)
        for section, values in kept.items()
    }
    return loaded.model_copy(update=update), needs_restart


# ---------------------------------------------------------------------------- the daemon


@dataclass
class _Slot:
    """One sync as the daemon schedules it: its runner, its lock, and how it last went."""

    sync: SyncConfig
    runner: SyncRunner
    lock: threading.Lock = field(default_factory=threading.Lock)
    pending: tuple[SyncConfig, SyncRunner] | None = None  # a reload's runner, swapped in between cycles
    retired: bool = False  # removed by a reload; cleaned up once its running cycle ends
    state: str = "starting"
    last_cycle_at: datetime | None = None

    @property
    def name(self) -> str:
        return self.sync.name


class Daemon:
    def __init__(self, config_path: Path, config: Config) -> None:
        self.config_path = config_path
        self.config = config
        self.signals = Signals()
        self.notifier = SystemdNotifier()
        self.progress = ProgressLog(lambda: self.runtime.runners)
        self.runtime: Runtime
        self.scheduler: BackgroundScheduler
        self.metrics_server: MetricsServer | None = None
        self.slots: dict[str, _Slot] = {}
        self._retiring: list[_Slot] = []
        self._retired_sources: list[Source] = []
        self._executor = "default"
        self._executor_moved = False  # a reload grew the pool: every job moves to the new one
        self._capacity = 0
        self._generation = 0
        watchdog = self.notifier.watchdog_interval()
        self._watchdog = watchdog
        # A heartbeat a few times per watchdog period, so one late beat is not yet fatal.
        self._heartbeat_s = min(HEARTBEAT_MAX_S, max(0.1, watchdog / 2)) if watchdog else HEARTBEAT_MAX_S
        self._beat = time.monotonic()
        self._loop_wait = min(MAX_LOOP_WAIT_S, watchdog) if watchdog else MAX_LOOP_WAIT_S
        self._last_status = ""
        self._summary_at = time.monotonic()

    # -- lifecycle

    def run(self) -> int:
        # Before the (possibly slow) migrations: a SIGTERM during startup then stops the
        # daemon cleanly once the loop starts, instead of killing it mid-migration.
        self.signals.install()
        try:
            if not self._start():
                return 1
            self._loop()
            return self._drain()
        finally:
            self.signals.uninstall()

    def _start(self) -> bool:
        config = self.config
        try:
            self.runtime = Runtime.open(
                config, should_stop=self.signals.should_stop, on_progress=self.progress, migrating=self._migrating
            )
        except Exception:  # state db unreachable, migration failed, ...: exit 1, not a crash
            log.exception("startup_failed", step="open runtime")
            return False
        if config.metrics.listen:
            try:
                self.metrics_server = self.runtime.metrics.serve(config.metrics.listen)
            except (OSError, ValueError) as error:
                log.error("startup_failed", step="metrics", listen=config.metrics.listen, error=_one_line(error))
                self.runtime.close()
                return False
        # +1: never zero workers, and room for a reload that adds one job.
        self._capacity = jobs_needed(config) + 1
        scheduler_log = logging.getLogger("apscheduler.scheduler")
        scheduler_log.addFilter(_ExpectedOverlap())
        # Two "Running job"/"executed" lines per heartbeat would drown `level = "debug"`.
        logging.getLogger("apscheduler.executors.heartbeat").setLevel(logging.WARNING)
        self.scheduler = BackgroundScheduler(
            logger=scheduler_log,
            jobstores={"default": MemoryJobStore()},
            executors={"default": ThreadPoolExecutor(self._capacity), "heartbeat": ThreadPoolExecutor(1)},
            job_defaults={"coalesce": True, "max_instances": 1},
            timezone=UTC,
        )
        self.scheduler.add_job(
            self._heartbeat,
            IntervalTrigger(seconds=self._heartbeat_s, timezone=UTC),
            id="heartbeat",
            executor="heartbeat",
            misfire_grace_time=max(1, int(self._heartbeat_s)),
            next_run_time=_now(),
        )
        for sync in config.syncs:
            slot = _Slot(sync, self.runtime.runners[sync.name])
            self.slots[sync.name] = slot
            self._schedule(slot, sync, run_now=True)
        self._beat = time.monotonic()  # startup (migrations) is not a stalled scheduler
        self.scheduler.start()
        self.notifier.ready(status=self._status_line())
        log.info(
            "started",
            version=_version(),
            pid=os.getpid(),
            syncs=[sync.name for sync in config.syncs],
            metrics=config.metrics.listen,
            watchdog_s=self._watchdog * 2 if self._watchdog else None,
        )
        return True

    @contextmanager
    def _migrating(self) -> Iterator[None]:
        """Around a state database migration: systemd's TimeoutStartSec= counts from the
        start, and an upgrade of a large state database can outlast it."""
        log.info("migrating_state_database")
        with self.notifier.extending_timeout(MIGRATION_EXTEND_S, status="migrating the state database"):
            yield
        log.info("state_database_migrated")

    def _loop(self) -> None:
        while not self.signals.stop_requested:
            self.signals.wait(self._loop_wait)
            if self.signals.stop_requested:
                break
            if self.signals.take_reload():
                self._reload()
            self._housekeeping()
            self._tick()

    def _tick(self) -> None:
        """Watchdog ping (only while the scheduler is really alive) and STATUS."""
        alive = self._scheduler_alive()
        if self._watchdog and alive:
            self.notifier.watchdog()
        status = self._status_line() if alive else "scheduler stalled: no heartbeat"
        if status != self._last_status:
            self._last_status = status
            self.notifier.status(status)
            if not alive:
                log.error("scheduler_stalled", last_heartbeat_s=round(time.monotonic() - self._beat, 1))
        if time.monotonic() - self._summary_at >= SUMMARY_EVERY_S:
            self._summary_at = time.monotonic()
            log.info("status", status=status)

    def _heartbeat(self) -> None:
        self._beat = time.monotonic()

    def _scheduler_alive(self) -> bool:
        fresh = time.monotonic() - self._beat < HEARTBEAT_MISSES * self._heartbeat_s + self._loop_wait
        return self.scheduler.running and fresh

    def _drain(self) -> int:
        """STOPPING=1, no new cycles, running ones finish their in-flight batches; bounded."""
        self.notifier.stopping()
        timeout = self.config.drain_timeout.total_seconds()
        self.notifier.status(f"draining (up to {timeout:g}s)")
        log.info("stopping", drain_timeout_s=timeout)
        self.scheduler.pause()  # runners already see should_stop(): no new batches are read
        deadline = time.monotonic() + timeout
        busy = []
        for slot in [*self.slots.values(), *self._retiring]:
            if slot.lock.acquire(timeout=max(deadline - time.monotonic(), 0)):
                continue  # held until exit: nothing may start on this sync any more
            busy.append(slot.name)
        self.scheduler.shutdown(wait=False)
        if busy:
            # A thread cannot be killed, and the interpreter would join it at exit; leave
            # without closing what it still uses. Its unacknowledged batches are sent again
            # by the next run (state only advances after an ACK); its lease expires.
            log.warning("drain_timeout", still_running=busy, action="exiting; their in-flight batches will be resent")
            self._close_metrics()
            sys.stderr.flush()
            os._exit(0)
        self.runtime.close()
        for source in self._retired_sources:
            source.dispose()
        self._close_metrics()
        log.info("stopped")
        return 0

    def _close_metrics(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.close()

    # -- jobs

    def _schedule(self, slot: _Slot, sync: SyncConfig, *, run_now: bool) -> None:
        """(Re)place the slot's jobs for `sync`, which for a changed sync is the new
        config while its old runner may still be finishing a cycle."""
        extra: dict[str, Any] = {"next_run_time": _now()} if run_now else {}
        self.scheduler.add_job(
            self._run_job,
            sync_trigger(sync),
            args=(slot, CycleKind.SYNC),
            id=f"sync:{sync.name}",
            name=f"sync {sync.name}",
            executor=self._executor,
            misfire_grace_time=sync_misfire_grace(sync),
            replace_existing=True,
            **extra,
        )
        trigger = reconcile_trigger(sync)
        if trigger is None:
            self._remove_job(f"reconcile:{sync.name}")
            return
        self.scheduler.add_job(
            self._run_job,
            trigger,
            args=(slot, CycleKind.RECONCILE),
            id=f"reconcile:{sync.name}",
            name=f"reconcile {sync.name}",
            executor=self._executor,
            misfire_grace_time=RECONCILE_GRACE_S,
            replace_existing=True,
        )

    def _remove_job(self, job_id: str) -> None:
        if self.scheduler.get_job(job_id) is not None:
            self.scheduler.remove_job(job_id)

    def _run_job(self, slot: _Slot, kind: CycleKind) -> None:
        """One scheduled run; never raises, so nothing a sync does reaches the scheduler."""
        if not self._acquire(slot, kind):
            return
        try:
            if slot.retired or self.signals.stop_requested:
                return
            self._swap_pending(slot)
            self.progress.begin(slot.name, kind)
            runner = self.runtime.runners[slot.name]
            report = runner.run_cycle() if kind is CycleKind.SYNC else runner.reconcile()
            slot.state = state.stored if (state := report.outcome.state) else "standby"  # skipped: another syncd runs it
            slot.last_cycle_at = datetime.now(UTC)
        except Exception:
            slot.state = "failing"
            log.exception("job_failed", sync=slot.name, kind=kind)
        finally:
            slot.lock.release()

    def _acquire(self, slot: _Slot, kind: CycleKind) -> bool:
        if kind is CycleKind.SYNC:
            # The reconcile (or a reload swapping the runner) has it: it is pushing
            # everything anyway, and the next interval comes soon.
            return slot.lock.acquire(blocking=False)
        while not slot.lock.acquire(timeout=1.0):  # a reconcile waits for the cycle
            if self.signals.stop_requested or slot.retired:
                return False
        return True

    # -- reload

    def _reload(self) -> None:
        self.notifier.reloading()
        self.notifier.status("reloading configuration")
        try:
            loaded = load_config(self.config_path)
        except ConfigError as error:
            log.error("reload_rejected", problem=str(error), action="still running the previous config")
            self.notifier.ready(status="reload rejected (see log); " + self._status_line())
            return
        _log_config_warnings(self.config_path, loaded)
        configure_logging(loaded.log.level, loaded.log.format)
        config, needs_restart = effective_config(self.config, loaded)
        if needs_restart:
            log.warning("reload_needs_restart", keys=needs_restart, action="systemctl restart syncd to apply these")
        try:
            summary = self._apply(config)
        except Exception:
            log.exception("reload_failed", action="still running the previous config")
            self.notifier.ready(status="reload failed (see log); " + self._status_line())
            return
        self.config = config
        self._generation += 1
        log.info("config_reloaded", generation=self._generation, **summary)
        _warn_if_drain_outlasts_stop(config)
        self.notifier.ready(status=self._status_line())

    def _apply(self, config: Config) -> dict[str, list[str]]:
        """Bring sources, runners and jobs in line with `config`.

        Everything that can fail (building sources and runners) happens first and is
        rolled back on error; then jobs are changed, which does not fail.
        """
        runtime, old = self.runtime, self.config
        changed_sources = {name for name, source in config.sources.items() if old.sources.get(name) != source}
        old_sources = runtime.sources
        old_config = runtime.config
        runtime.sources = {
            name: open_source(config, name) if name in changed_sources else old_sources[name]
            for name in config.sources
        }
        runtime.config = config  # runtime.runner() reads [api] and [state] from here
        current = {sync.name for sync in old.syncs}
        added, changed, unchanged = [], [], []
        built: dict[str, SyncRunner] = {}
        try:
            for sync in config.syncs:
                if sync.name not in current:
                    added.append(sync.name)
                elif sync != old.sync(sync.name) or sync.source in changed_sources or config.api != old.api:
                    changed.append(sync.name)
                else:
                    unchanged.append(sync.name)
                    continue
                built[sync.name] = runtime.runner(
                    sync, should_stop=self.signals.should_stop, on_progress=self.progress
                )
            if added:
                runtime.state.ensure_syncs(added)
            stored = runtime.state.status() if added else []
        except Exception:
            for source in runtime.sources.values():
                if source not in old_sources.values():
                    source.dispose()
            runtime.sources, runtime.config = old_sources, old_config
            raise
        self._retired_sources.extend(s for n, s in old_sources.items() if runtime.sources.get(n) is not s)
        runtime.client.limiter.per_second = config.api.requests_per_second
        removed = sorted(current - {sync.name for sync in config.syncs})
        self._ensure_capacity(jobs_needed(config))
        for name in removed:
            slot = self.slots.pop(name)
            slot.retired = True
            self._remove_job(f"sync:{name}")
            self._remove_job(f"reconcile:{name}")
            self._retiring.append(slot)
        for sync in config.syncs:
            name = sync.name
            if name in added:
                runtime.runners[name] = built[name]
                slot = self.slots[name] = _Slot(sync, built[name])
                # Removed earlier and back before its last cycle ended: share that cycle's
                # lock (so the two never overlap) and cancel its clean-up.
                for previous in [s for s in self._retiring if s.name == name]:
                    self._retiring.remove(previous)
                    slot.lock = previous.lock
            elif name in changed:
                slot = self.slots[name]
                slot.pending = (sync, built[name])
            else:
                slot = self.slots[name]
                slot.runner.stopped = None  # a reload is how an operator says "config fixed"
                if self._executor_moved:
                    self._schedule(slot, sync, run_now=False)
                continue
            self._schedule(slot, sync, run_now=True)
        self._executor_moved = False
        runtime.metrics.restore(stored, [sync for sync in config.syncs if sync.name in built])
        return {"added": added, "removed": removed, "changed": changed, "unchanged": unchanged}

    def _ensure_capacity(self, needed: int) -> None:
        """APScheduler cannot resize a pool: when a reload adds jobs beyond it, a new
        pool takes every job (the old one finishes what it runs, then idles)."""
        if needed <= self._capacity:
            return
        alias = f"pool-{self._generation + 1}"
        self.scheduler.add_executor(ThreadPoolExecutor(needed + 1), alias=alias)
        self._executor, self._capacity, self._executor_moved = alias, needed + 1, True

    def _swap_pending(self, slot: _Slot) -> None:
        """Install a reload's runner; the caller holds the slot's lock (between cycles)."""
        if slot.pending is None:
            return
        slot.sync, slot.runner = slot.pending
        slot.pending = None
        self.runtime.runners[slot.name] = slot.runner

    def _housekeeping(self) -> None:
        """Finish what a reload deferred until a sync was between cycles."""
        for slot in list(self.slots.values()):
            if slot.pending is not None and slot.lock.acquire(blocking=False):
                try:
                    self._swap_pending(slot)
                finally:
                    slot.lock.release()
        for slot in list(self._retiring):
            if slot.lock.acquire(blocking=False):  # kept: nothing may run it any more
                self._retiring.remove(slot)
                self.runtime.runners.pop(slot.name, None)
                self.runtime.state.release_lease(slot.name)
                self.runtime.metrics.forget(slot.name)
                log.info("sync_removed", sync=slot.name)
        in_use = {id(slot.runner.reader.source) for slot in [*self.slots.values(), *self._retiring]}
        for source in list(self._retired_sources):
            if id(source) not in in_use:
                source.dispose()
                self._retired_sources.remove(source)

    # -- status

    def _status_line(self) -> str:
        """One line for `systemctl status`: "3 syncs: 2 ok, 1 failing; last cycle 12:01:03"."""
        counts: dict[str, int] = {}
        for slot in self.slots.values():
            counts[slot.state] = counts.get(slot.state, 0) + 1
        parts = ", ".join(f"{n} {state}" for state, n in sorted(counts.items(), key=lambda kv: -kv[1]))
        times = [slot.last_cycle_at for slot in self.slots.values() if slot.last_cycle_at]
        total = len(self.slots)
        line = f"{total} sync{'s' if total != 1 else ''}" + (f": {parts}" if parts else "")
        if times:
            line += f"; last cycle {max(times):%H:%M:%S} UTC"
        return line


def _now() -> datetime:
    return datetime.now(UTC)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


