"""`python -m tests.faultcheck --seed N [--daemons K] [--duration S]`: replay one seed (or a range).

Prints the fault schedule and one JSON line per seed; exits 1 if any seed lost or staled a key.
"""

from __future__ import annotations

import argparse
import itertools
import signal
import sys
import tempfile
from pathlib import Path

from .harness import filter_supported, run
from .plan import FAULT_KINDS, make_plan


def _seeds(text: str) -> list[int]:
    seeds: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        seeds.extend(range(int(first), int(last or first) + 1))
    return seeds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faultcheck", description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--seed", type=int, help="the seed to run")
    which.add_argument("--seeds", type=_seeds, help="seeds to run, e.g. 1-100 or 3,8,20-25")
    parser.add_argument("--daemons", type=int, choices=(1, 2, 3), help="daemons (default: drawn from the seed)")
    parser.add_argument(
        "--duration", type=float, help="seconds of writes and faults (default: drawn, 2.5-4, longer for a SIGSTOP)"
    )
    kinds_help = f"fault kinds to draw from (default {','.join(FAULT_KINDS)}; '' for none)"
    parser.add_argument("--faults", default=",".join(FAULT_KINDS), help=kinds_help)
    parser.add_argument("--workdir", type=Path, help="keep each run's configs and logs under this directory")
    args = parser.parse_args(argv)
    kinds = tuple(kind for kind in args.faults.split(",") if kind)
    unknown = set(kinds) - set(FAULT_KINDS)
    if unknown:
        parser.error(f"unknown fault kind(s): {', '.join(sorted(unknown))}")

    # SIGTERM (a `timeout`, a CI job cancelled) unwinds like Ctrl-C: the run's daemons, simulator,
    # proxies and databases are stopped and dropped on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with tempfile.TemporaryDirectory(prefix="faultcheck-") as scratch:
        root = args.workdir or Path(scratch)
        soft_deletes = filter_supported(root if args.workdir else Path(scratch))
        failed = []
        for seed in [args.seed] if args.seed is not None else args.seeds:
            plan = make_plan(
                seed, daemons=args.daemons, duration=args.duration, soft_deletes=soft_deletes, faults=kinds
            )
            workdir = root / f"seed-{seed}"
            for replay in itertools.count(2):  # a seed run again gets a directory of its own
                if not workdir.exists():
                    break
                workdir = root / f"seed-{seed}-{replay}"
            result = run(plan, workdir, say=lambda line: print(line, file=sys.stderr, flush=True))
            print(result.line(), flush=True)
            if not result.ok:
                failed.append(seed)
        if failed:
            replay = "replay with --seed N --workdir DIR for the logs"
            print(f"lost or stale keys in seed(s) {failed}: {replay}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
