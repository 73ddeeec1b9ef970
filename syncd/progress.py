"""Progress of a long backfill: a bar per sync in a terminal, nothing otherwise.

The daemon reports progress through its logs instead; this is for `syncd once` run by a
person, who wants to know whether to wait or go for coffee.
"""

from __future__ import annotations

import threading
import time
from typing import Any, TextIO

from syncd.cycle import CycleReport

__all__ = ["ProgressDisplay"]


class ProgressDisplay:
    def __init__(self, stream: TextIO | None) -> None:
        self.stream = stream
        self._lock = threading.Lock()
        self._totals: dict[str, int | None] = {}
        self._done: dict[str, int] = {}
        self._started = time.monotonic()
        self._last_draw = 0.0

    @classmethod
    def for_terminal(cls, stream: TextIO, *, enabled: bool = True) -> ProgressDisplay:
        return cls(stream if enabled and stream.isatty() else None)

    def start(self, runners: dict[str, Any]) -> None:
        if self.stream is None:
            return
        for name, runner in runners.items():
            try:
                self._totals[name] = runner.reader.backlog(runner.state.cursor(name))
            except Exception:  # a progress bar is never worth failing the run
                self._totals[name] = None
            self._done[name] = 0

    def update(self, report: CycleReport) -> None:
        if self.stream is None:
            return
        with self._lock:
            self._done[report.sync] = report.rows_read
            now = time.monotonic()
            if now - self._last_draw >= 0.2:
                self._last_draw = now
                self._draw()

    def finish(self) -> None:
        if self.stream is None:
            return
        with self._lock:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self) -> None:
        assert self.stream is not None
        elapsed = max(time.monotonic() - self._started, 1e-6)
        parts = []
        for name, done in self._done.items():
            total = self._totals.get(name)
            rate = done / elapsed
            if total:
                fraction = min(done / total, 1.0)
                bar = "#" * int(fraction * 20)
                eta = (total - done) / rate if rate > 0 else 0
                parts.append(f"{name} [{bar:<20}] {done:,}/{total:,} {rate:,.0f} rows/s eta {eta:,.0f}s")
            else:
                parts.append(f"{name} {done:,} rows {rate:,.0f} rows/s")
        self.stream.write("\r" + " | ".join(parts) + "\x1b[K")
        self.stream.flush()
