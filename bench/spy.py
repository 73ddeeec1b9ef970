"""Where syncd's backfill spends its time: py-spy over `syncd once`, summed by stage.

The backfill is bound by one thread (the sync thread reads, maps, looks up digests and
commits state; push threads mostly wait on the socket), so the useful view is the share
of that thread's samples in each stage, plus the hottest functions overall.

Usage: .venv/bin/python bench/spy.py [--rows N] [--command once|reconcile]
(`pip install py-spy`; `--command reconcile` profiles a reconcile after a backfill.)
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import write_config
from run import PYTHON, SYNCD, simulator
from seed import TABLE, seed

# Stage name → a frame that marks it; a sample counts for every stage it is inside of.
STAGES = {
    "state: commit_batch (all)": "StateStore.commit_batch",
    "state:   digest upsert": "_upsert_digests",
    "state: known_digests lookup": "StateStore.known_digests",
    "source: read rows": "TableReader._chunks",
    "mapping: Mapping.__call__": "Mapping.__call__",
    "mapping:   e164": "to_e164",
    "mapping: encode_payload": "encode_payload",
    "mapping: digest": "payload_digester.<locals>.digest",
    "cycle: submit to push pool": "ThreadPoolExecutor.submit",
}
SYNC_THREAD = {"once": "_once.<locals>.one", "reconcile": "_reconcile"}
IDLE_FRAMES = ("_worker (concurrent/futures/thread.py:81)", "_wait_for_tstate_lock")


def summarise(raw: Path, command: str, top: int = 15) -> str:
    """py-spy's raw (collapsed) stacks → stage shares of the sync thread, top self-time."""
    in_sync, total = 0, 0
    stages: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if any(frames[-1].startswith(idle) or idle in frames[-1] for idle in IDLE_FRAMES):
            continue  # a worker blocked on its queue is waiting, not working
        samples = int(count)
        total += samples
        own[frames[-1]] += samples
        if SYNC_THREAD[command] in stack:
            in_sync += samples
            for stage, marker in STAGES.items():
                if marker in stack:
                    stages[stage] += samples
    lines = [f"sync thread: {in_sync} samples of {total} busy samples (all threads)", ""]
    lines += [f"{100 * stages[name] / max(in_sync, 1):5.1f}%  {name}" for name in STAGES]
    lines += ["", f"top self time (all threads, % of {total}):"]
    lines += [f"{100 * n / total:5.1f}%  {frame}" for frame, n in own.most_common(top)]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--command", choices=sorted(SYNC_THREAD), default="once")
    parser.add_argument("--dsn", default=os.environ.get("BENCH_DSN", "postgresql://root@127.0.0.1:5432/test"))
    parser.add_argument("--schema", default="bench")
    parser.add_argument("--out", type=Path, help="keep py-spy's raw (collapsed) stacks in this file")
    parser.add_argument("--gil", action="store_true", help="only samples holding the GIL (who keeps the others waiting)")
    args = parser.parse_args()
    spy = shutil.which("py-spy", path=str(Path(PYTHON).parent)) or shutil.which("py-spy")
    if spy is None:
        sys.exit("py-spy not found: .venv/bin/pip install py-spy")
    work = Path(tempfile.mkdtemp(prefix="syncd-profile-"))
    token_file = work / "api-token"
    token_file.write_text("profile-token\n")
    seed(args.dsn, args.schema, args.rows)
    with simulator("profile-token") as api_url:
        config = write_config(
            work / "bench-config.toml",
            source_url=args.dsn.replace("postgresql://", "postgresql+psycopg://", 1),
            table=f"{args.schema}.{TABLE}",
            api_url=api_url,
            token_file=token_file,
            state_url=f"sqlite:///{work / 'state.db'}",
            max_in_flight=3,
        )
        once = [SYNCD, "once", "-c", str(config), "--no-progress"]
        if args.command == "reconcile":
            subprocess.run(once, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        raw = args.out or work / f"{args.command}.raw"
        target = once if args.command == "once" else [SYNCD, "reconcile", "-c", str(config)]
        with open(work / "syncd.log", "w") as log:  # keep syncd's own output out of the summary
            subprocess.run(
                [spy, "record", "-r", "100", "-f", "raw", *(["--gil"] if args.gil else []), "-o", str(raw), "--", *target], check=True, stderr=log, stdout=log
            )
    print(summarise(raw, args.command))
    shutil.rmtree(work, ignore_errors=True)  # the state db; raw stacks survive only with --out
    return 0


if __name__ == "__main__":
    sys.exit(main())
