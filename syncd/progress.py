"""Progress of a long backfill: a bar per sync in a terminal, nothing otherwise.

The daemon reports progress through its logs instead; this is for `syncd once` run by a
person, who wants to know whether to wait or go for coffee.

The bars are tqdm's: they fit the terminal's width (and follow it when it is resized),
and while they are shown, log lines go through tqdm, which prints them above the bars
instead of through them. tqdm is imported only when bars are shown.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any, TextIO

from syncd.cycle import CycleReport

__all__ = ["ProgressDisplay"]


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
