"""syncd's idle cycle as the daemon runs it: several cycles in one process, nothing changed.

`syncd once` is a fresh process, so its only cycle also pays for the first connection to
the source and the table's reflection; `syncd run` pays that once and then cycles warm.
This runs the same `SyncRunner.run_cycle` the daemon calls, `1 + K` times in a row, and
reports the first (cold) and the other (warm) durations, each timed inside syncd.

Usage: python bench/warm_idle.py CONFIG K
"""

from __future__ import annotations

import sys
from pathlib import Path

from common import emit

from syncd.config import load_config
from syncd.logs import configure_logging
from syncd.runtime import Runtime


def main(config_path: str, warm_cycles: str) -> None:
    config = load_config(Path(config_path))
    configure_logging("warning", "json")
    with Runtime.open(config) as runtime:
        runner = runtime.runners[config.syncs[0].name]
        reports = [runner.run_cycle() for _ in range(1 + int(warm_cycles))]
    bad = [r for r in reports if r.outcome != "ok" or r.rows_read]
    if bad:
        raise SystemExit(f"not an idle cycle: {bad[0].summary()}")
    emit(cold_s=reports[0].duration_s, warm_s=[r.duration_s for r in reports[1:]])


if __name__ == "__main__":
    main(*sys.argv[1:3])
