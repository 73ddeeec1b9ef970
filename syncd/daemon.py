"""`syncd run`: run every sync on its schedule, notify systemd, drain on SIGTERM, reload on SIGHUP.

This module only schedules, handles signals and notifies systemd; what a cycle does
lives in `syncd.cycle`, when it runs in `syncd.schedule`, what a reload changes in
`syncd.reload`, the `progress` lines in `syncd.progress`.

Threads and who owns what:
- The **main thread** owns the control loop. Signal handlers only set flags; Python
  also writes the signal number to a socket (`signal.set_wakeup_fd`) that the loop
  waits on, so a signal wakes it at once without the handler taking any lock (a
  handler calling `threading.Event.set()` can deadlock if it interrupts the main
  thread inside that Event's own lock). The loop reloads, drains, pings the watchdog
  and writes `STATUS=`.
- **One thread per sync** (`SyncLoop`) runs that sync's cycles and reconciles, one at
  a time, and sleeps until the next is due. Chosen over APScheduler's scheduler and
  pool, which needed a pool resized on reload, a heartbeat job to prove the scheduler
  thread alive, and a log filter for its "maximum number of running instances"
  warning: here no two runs of one sync can overlap (one thread runs them), one slow
  sync never waits for another (each has its own thread), and a cycle due while one
  runs is simply the next thing that thread does. APScheduler remains only as the
  cron expression calculator (`syncd.schedule`).

`WATCHDOG=1` is sent while the main loop runs and every sync's loop thread is alive:
only a bug ends one, and then nothing would run that sync again. It deliberately does
not require cycles to finish: a backfill may take hours, and a restart would only
start it over. A hung cycle shows in `syncd status` and the metrics.

Stop (SIGTERM/SIGINT): `STOPPING=1`, every loop is woken and starts nothing new, and
every runner's `should_stop()` turns true, so cycles read no new batch while the
batches already on the wire finish and commit. After `drain_timeout` the daemon exits
0 regardless: a thread cannot be killed, so a cycle still running then is abandoned
(`os._exit`), which costs only its unacknowledged batches being sent again by the next run.

Reload (SIGHUP): `syncd.reload` says what changed and which keys need a restart
(`reload_needs_restart`); here new runners are built (rolled back if any fails), a
changed sync's loop swaps its runner in between runs and runs at once, a removed
sync's loop ends after its running cycle, and a sync added back before that waits
for it.
"""

from __future__ import annotations

import importlib.metadata
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

from syncd.config import Config, ConfigError, SyncConfig, config_warnings, load_config
from syncd.cycle import SyncRunner
from syncd.logs import configure_logging, get_logger
from syncd.metrics import MetricsServer
from syncd.notify import SystemdNotifier
from syncd.progress import ProgressLog
from syncd.reload import effective_config, plan_reload
from syncd.runtime import Runtime, open_source
from syncd.schedule import RECONCILE_GRACE_S, CycleSchedule, ReconcileSchedule
from syncd.source import Source
from syncd.values import CycleKind

__all__ = ["run_daemon"]

log = get_logger(__name__)

MAX_LOOP_WAIT_S = 1.0  # the main loop wakes at least this often, for STATUS and housekeeping
MAX_SLEEP_S = 60.0  # a sync's loop re-reads the clocks at least this often
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


# ---------------------------------------------------------------------------- one loop per sync


class SyncLoop:
    """One sync's thread: its cycles and reconciles, one at a time, and the sleeps between.

    A sync's cycle and its reconcile never overlap because one thread runs both (a
    reconcile due during a cycle runs right after it; cycles due during a reconcile
    coalesce into one after it). One slow sync never delays another: each has its own
    thread. A runner changed by a reload is swapped in at the top of the loop, between
    runs, and runs at once. Asleep, the thread is a timed wait on its Event, woken
    early by a reload or a stop.
    """

    def __init__(
        self,
        sync: SyncConfig,
        runner: SyncRunner,
        *,
        runners: dict[str, SyncRunner],
        progress: ProgressLog,
        should_stop: Callable[[], bool],
        run_now: bool = True,
        follows: SyncLoop | None = None,
    ) -> None:
        self.sync = sync
        self.runner = runner
        self.follows = follows  # the same sync's loop from before a reload removed it, maybe still running
        self.retired = False  # removed by a reload: ends after its running cycle
        self.state = "starting"
        self.last_cycle_at: datetime | None = None
        self._runners = runners  # the runtime's, so progress and close() see the runner in use
        self._progress = progress
        self._should_stop = should_stop
        self._run_now = run_now
        self._pending: tuple[SyncConfig, SyncRunner] | None = None
        self._pending_lock = threading.Lock()
        self._wake = threading.Event()
        self.thread = threading.Thread(target=self._main, name=f"sync-{sync.name}", daemon=True)

    @property
    def name(self) -> str:
        return self.sync.name

    def start(self) -> None:
        self.thread.start()

    def replace(self, sync: SyncConfig, runner: SyncRunner) -> None:
        """Run `runner` (a reload's) from the next run on, which starts at once."""
        with self._pending_lock:
            self._pending = (sync, runner)
        self._wake.set()

    def retire(self) -> None:
        self.retired = True
        self._wake.set()

    def wake(self) -> None:
        """Re-check the stop flag now rather than at the end of the sleep."""
        self._wake.set()

    def _main(self) -> None:
        try:
            self._loop()
        except Exception:  # a bug here, not in a cycle: the watchdog stops, systemd restarts us
            log.exception("sync_loop_failed", sync=self.name)

    def _loop(self) -> None:
        if self.follows is not None:  # never two cycles of one sync at once
            while self.follows.thread.is_alive() and not self._should_stop():
                self.follows.thread.join(MAX_LOOP_WAIT_S)
        cycles = CycleSchedule(self.sync)
        reconciles = ReconcileSchedule.of(self.sync)
        next_cycle = cycles.first(run_now=self._run_now)
        next_reconcile = reconciles.next_after(datetime.now(UTC)) if reconciles else None
        while True:
            self._wake.clear()  # before the checks: a wake from now on ends the sleep below
            if self._should_stop() or self.retired:
                return
            if self._swap():
                cycles = CycleSchedule(self.sync)
                reconciles = ReconcileSchedule.of(self.sync)
                next_cycle = cycles.first(run_now=True)
                next_reconcile = reconciles.next_after(datetime.now(UTC)) if reconciles else None
            wall = datetime.now(UTC)
            if reconciles is not None and next_reconcile is not None and next_reconcile <= wall:
                late_s = (wall - next_reconcile).total_seconds()
                next_reconcile = reconciles.next_after(wall)
                if late_s <= RECONCILE_GRACE_S:
                    self._run(CycleKind.RECONCILE)
                else:
                    log.warning("reconcile_missed", sync=self.name, late_s=round(late_s), next=str(next_reconcile))
                continue
            now = time.monotonic()
            if next_cycle <= now:
                self._run(CycleKind.SYNC)
                next_cycle = cycles.next()
                continue
            sleep = next_cycle - now
            if next_reconcile is not None:
                sleep = min(sleep, (next_reconcile - wall).total_seconds())
            self._wake.wait(min(sleep, MAX_SLEEP_S))  # capped: a wall-clock step is noticed

    def _swap(self) -> bool:
        with self._pending_lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return False
        self.sync, self.runner = pending
        self._runners[self.name] = self.runner
        return True

    def _run(self, kind: CycleKind) -> None:
        """One run; never raises, so nothing a sync does ends its loop."""
        try:
            self._progress.begin(self.name, kind)
            report = self.runner.run_cycle() if kind is CycleKind.SYNC else self.runner.reconcile()
            self.state = state.stored if (state := report.outcome.state) else "standby"  # skipped: another syncd runs it
            self.last_cycle_at = datetime.now(UTC)
        except Exception:
            self.state = "failing"
            log.exception("job_failed", sync=self.name, kind=kind)


# ---------------------------------------------------------------------------- the daemon


class Daemon:
    def __init__(self, config_path: Path, config: Config) -> None:
        self.config_path = config_path
        self.config = config
        self.signals = Signals()
        self.notifier = SystemdNotifier()
        self.progress = ProgressLog(lambda: self.runtime.runners)
        self.runtime: Runtime
        self.metrics_server: MetricsServer | None = None
        self.loops: dict[str, SyncLoop] = {}
        self._retiring: list[SyncLoop] = []  # removed by a reload, their last cycle maybe still running
        self._retired_sources: list[Source] = []
        self._generation = 0
        watchdog = self.notifier.watchdog_interval()
        self._watchdog = watchdog
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
        for sync in config.syncs:
            self.loops[sync.name] = self._sync_loop(sync, self.runtime.runners[sync.name])
        for loop in self.loops.values():
            loop.start()
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

    def _sync_loop(self, sync: SyncConfig, runner: SyncRunner, follows: SyncLoop | None = None) -> SyncLoop:
        return SyncLoop(
            sync,
            runner,
            runners=self.runtime.runners,
            progress=self.progress,
            should_stop=self.signals.should_stop,
            follows=follows,
        )

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
        """Watchdog ping (only while every sync's loop is alive) and STATUS."""
        ended = self._ended_loops()
        if self._watchdog and not ended:
            self.notifier.watchdog()
        status = self._status_line() if not ended else f"stalled: the loop of {', '.join(ended)} ended"
        if status != self._last_status:
            self._last_status = status
            self.notifier.status(status)
            if ended:
                log.error("sync_loop_ended", syncs=ended, action="the watchdog stops; systemd restarts syncd")
        if time.monotonic() - self._summary_at >= SUMMARY_EVERY_S:
            self._summary_at = time.monotonic()
            log.info("status", status=status)

    def _ended_loops(self) -> list[str]:
        """Syncs whose loop thread is gone: only a bug ends one, and then nothing runs it.

        Cycles are not required to finish: a backfill may take hours, and a restart would
        only start it over. A hung cycle shows in `syncd status` and the metrics.
        """
        return [name for name, loop in self.loops.items() if not loop.thread.is_alive()]

    def _drain(self) -> int:
        """STOPPING=1, no new cycles, running ones finish their in-flight batches; bounded."""
        self.notifier.stopping()
        timeout = self.config.drain_timeout.total_seconds()
        self.notifier.status(f"draining (up to {timeout:g}s)")
        log.info("stopping", drain_timeout_s=timeout)
        loops = [*self.loops.values(), *self._retiring]
        loops += [loop.follows for loop in loops if loop.follows is not None]
        for loop in loops:
            loop.wake()  # runners already see should_stop(): no new batches are read
        deadline = time.monotonic() + timeout
        busy = []
        for loop in loops:
            loop.thread.join(max(deadline - time.monotonic(), 0))
            if loop.thread.is_alive():
                busy.append(loop.name)
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
        """Bring sources, runners and loops in line with `config`.

        Everything that can fail (building sources and runners) happens first and is
        rolled back on error; then loops are changed, which does not fail.
        """
        runtime = self.runtime
        plan = plan_reload(self.config, config)
        old_sources, old_config = runtime.sources, runtime.config
        runtime.sources = {
            name: open_source(config, name) if name in plan.changed_sources else old_sources[name]
            for name, source in config.sources.items()
        }
        runtime.config = config  # runtime.runner() reads [api] and [state] from here
        built: dict[str, SyncRunner] = {}
        try:
            for name in [*plan.added, *plan.changed]:
                built[name] = runtime.runner(
                    config.sync(name), should_stop=self.signals.should_stop, on_progress=self.progress
                )
            if plan.added:
                runtime.state.ensure_syncs(plan.added)
            stored = runtime.state.status() if plan.added else []
        except Exception:
            for source in runtime.sources.values():
                if source not in old_sources.values():
                    source.dispose()
            runtime.sources, runtime.config = old_sources, old_config
            raise
        self._retired_sources.extend(s for n, s in old_sources.items() if runtime.sources.get(n) is not s)
        runtime.client.limiter.per_second = config.api.requests_per_second
        for name in plan.removed:
            loop = self.loops.pop(name)
            loop.retire()
            self._retiring.append(loop)
        for name in plan.added:
            # Removed earlier and back before its last cycle ended: the new loop waits for
            # that cycle (so the two never overlap), and its clean-up is cancelled.
            previous = next((loop for loop in self._retiring if loop.name == name), None)
            if previous is not None:
                self._retiring.remove(previous)
            runtime.runners[name] = built[name]
            self.loops[name] = loop = self._sync_loop(config.sync(name), built[name], follows=previous)
            loop.start()
        for name in plan.changed:
            self.loops[name].replace(config.sync(name), built[name])
        for name in plan.unchanged:
            self.loops[name].runner.stopped = None  # a reload is how an operator says "config fixed"
        runtime.metrics.restore(stored, [sync for sync in config.syncs if sync.name in built])
        return plan.summary()

    def _housekeeping(self) -> None:
        """Finish what a reload deferred until a removed sync's last cycle ended."""
        for loop in list(self._retiring):
            if not loop.thread.is_alive():
                self._retiring.remove(loop)
                self.runtime.runners.pop(loop.name, None)
                self.runtime.state.release_lease(loop.name)
                self.runtime.metrics.forget(loop.name)
                log.info("sync_removed", sync=loop.name)
        loops = [*self.loops.values(), *self._retiring]
        loops += [loop.follows for loop in loops if loop.follows is not None]
        in_use = {id(loop.runner.reader.source) for loop in loops}
        for source in list(self._retired_sources):
            if id(source) not in in_use:
                source.dispose()
                self._retired_sources.remove(source)

    # -- status

    def _status_line(self) -> str:
        """One line for `systemctl status`: "3 syncs: 2 ok, 1 failing; last cycle 12:01:03"."""
        counts: dict[str, int] = {}
        for loop in self.loops.values():
            counts[loop.state] = counts.get(loop.state, 0) + 1
        parts = ", ".join(f"{n} {state}" for state, n in sorted(counts.items(), key=lambda kv: -kv[1]))
        times = [loop.last_cycle_at for loop in self.loops.values() if loop.last_cycle_at]
        total = len(self.loops)
        line = f"{total} sync{'s' if total != 1 else ''}" + (f": {parts}" if parts else "")
        if times:
            line += f"; last cycle {max(times):%H:%M:%S} UTC"
        return line


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"
