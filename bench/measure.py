"""Run one contender as a child process and measure its wall time and peak memory.

Peak RSS is taken two ways and the larger is kept:
- `os.wait4` on the child's pid returns that child's own rusage, whose `ru_maxrss` is the
  kernel's high-water mark for it (and for any descendant it waited for), exact however
  short the spike; it is per child, so runs never blur into one another the way
  `getrusage(RUSAGE_CHILDREN)` across the whole bench would;
- a poll (every 50 ms) of the RSS *summed* over the child's process tree, which is what
  matters if a contender fans out into worker processes at the same time.

Summed RSS counts a page shared by two processes (the Python binary, shared libraries)
twice. The same poll therefore also sums PSS (`/proc/PID/smaps_rollup`: each shared page
split between the processes mapping it), which is what the tree really occupies, the way
the kernel's cgroup accounting (systemd's MemoryPeak=) counts it. For one process the two
differ only by its share of libraries other processes also map.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import psutil
from common import RESULT_PREFIX

POLL_S = 0.05


@dataclass(frozen=True, slots=True)
class Measured:
    argv: tuple[str, ...]
    returncode: int
    wall_s: float
    peak_rss_mb: float
    peak_pss_mb: float
    stdout: str
    stderr: str

    def result(self) -> dict[str, Any]:
        """The contender's own `BENCH_RESULT` line, parsed."""
        for line in self.stdout.splitlines():
            if line.startswith(RESULT_PREFIX):
                return orjson.loads(line[len(RESULT_PREFIX) :])
        raise RuntimeError(f"{self.argv[1]}: no result line\n{self.stderr[-3000:]}")

    def json_lines(self, event: str) -> list[dict[str, Any]]:
        """syncd's structured log lines (stderr) whose `event` is `event`."""
        found = []
        for line in self.stderr.splitlines():
            if line.startswith("{"):
                try:
                    record = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                if record.get("event") == event:
                    found.append(record)
        return found

    def check(self) -> Measured:
        if self.returncode != 0:
            raise RuntimeError(
                f"{' '.join(self.argv)} exited {self.returncode}\n--- stdout\n{self.stdout[-2000:]}\n"
                f"--- stderr\n{self.stderr[-4000:]}"
            )
        return self


def run_measured(argv: Sequence[str], *, env: dict[str, str] | None = None, timeout_s: float = 1800) -> Measured:
    """Run `argv` to completion; its output goes through files so a full pipe never stalls it."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        process = subprocess.Popen(argv, stdout=out, stderr=err, env=env)
        polled = _TreePoller(process.pid)
        polled.start()
        deadline = started + timeout_s
        while True:  # wait4 with a deadline: WNOHANG and a short sleep
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                process.kill()
                pid, status, usage = os.wait4(process.pid, 0)
                break
            time.sleep(0.01)
        wall = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)  # so Popen never reaps it again
        polled.stop()
        out.seek(0)
        err.seek(0)
        return Measured(
            argv=tuple(argv),
            returncode=process.returncode,
            wall_s=wall,
            peak_rss_mb=max(usage.ru_maxrss / 1024, polled.peak_bytes / 2**20),  # ru_maxrss is KiB
            peak_pss_mb=polled.peak_pss_kib / 1024,
            stdout=out.read().decode(errors="replace"),
            stderr=err.read().decode(errors="replace"),
        )


class _TreePoller(threading.Thread):
    """Samples the summed RSS and PSS of a process and all its descendants until stopped."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak_bytes = 0
        self.peak_pss_kib = 0
        self._done = threading.Event()

    def run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._done.is_set():
            try:
                total, pss = root.memory_info().rss, _pss_kib(root.pid)
                for child in root.children(recursive=True):
                    try:
                        total += child.memory_info().rss
                        pss += _pss_kib(child.pid)
                    except (psutil.Error, OSError):
                        pass
            except (psutil.Error, OSError):
                return
            self.peak_bytes = max(self.peak_bytes, total)
            self.peak_pss_kib = max(self.peak_pss_kib, pss)
            self._done.wait(POLL_S)

    def stop(self) -> None:
        self._done.set()
        self.join()


def _pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0
