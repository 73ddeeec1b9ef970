"""Progress of a long cycle: `progress` log lines in the daemon, bars in a terminal.

`ProgressLog` is the daemon's: rate-limited log lines with a rate and an estimate of
what is left. `ProgressDisplay` is for `syncd once` run by a person, who wants to know
whether to wait or go for coffee: a bar per sync in a terminal, nothing otherwise.

The bars are tqdm's: they fit the terminal's width (and follow it when it is resized),
and while they are shown, log lines go through tqdm, which prints them above the bars
instead of through them. tqdm is imported only when bars are shown.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TextIO

from syncd.cycle import CycleReport, SyncRunner
from syncd.logs import get_logger
from syncd.values import CycleKind

__all__ = ["ProgressDisplay", "ProgressLog"]

log = get_logger(__name__)

PROGRESS_EVERY_S = 10.0  # a long cycle logs `progress` this often


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


class ProgressDisplay:
    def __init__(self, stream: TextIO | None) -> None:
        self.stream = stream
        self._lock = threading.Lock()
        self._bars: dict[str, Any] = {}
        self._last: dict[str, int] = {}  # rows_read of each sync's current cycle, as last reported

    @classmethod
    def for_terminal(cls, stream: TextIO, *, enabled: bool = True) -> ProgressDisplay:
        return cls(stream if enabled and stream.isatty() else None)

    @contextlib.contextmanager
    def showing(self, runners: dict[str, Any]) -> Iterator[None]:
        """Show one bar per sync (its total: the backlog now) while the block runs."""
        if self.stream is None:
            yield
            return
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        for position, (name, runner) in enumerate(runners.items()):
            try:
                total = runner.reader.backlog(runner.state.cursor(name))
            except Exception:  # a progress bar is never worth failing the run
                total = None
            bar = tqdm(
                total=total or None,
                desc=name,
                unit=" rows",
                unit_scale=True,
                file=self.stream,
                dynamic_ncols=True,
                position=position,
                mininterval=0.2,
                leave=True,
            )
            with self._lock:
                self._bars[name] = bar
                self._last[name] = 0
        try:
            with logging_redirect_tqdm():
                yield
        finally:
            with self._lock:
                bars, self._bars = self._bars, {}
            for bar in bars.values():
                bar.close()

    def update(self, report: CycleReport) -> None:
        """Called from the sync threads after each batch with the cycle's report so far."""
        with self._lock:
            bar = self._bars.get(report.sync)
            if bar is None:
                return
            last = self._last.get(report.sync, 0)
            # rows_read counts within one cycle; `once` may run a few cycles in a row.
            delta = report.rows_read - last if report.rows_read >= last else report.rows_read
            self._last[report.sync] = report.rows_read
        if delta:
            bar.update(delta)
